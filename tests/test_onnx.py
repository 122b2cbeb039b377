"""ONNX export: the graph reproduces PyTorch with the same masks, for both presets."""

import json

import numpy as np
import onnx
import pytest
import torch

from fednca import modelfile
from fednca_app.cli import main
from fednca.config import preset
from fednca.model import build, tensors
from fednca.onnx_export import ExportError, export_onnx
from fednca.segment import FORMAT, META_FORMAT, META_MODEL, META_SHA256, Segmenter, draw_masks
from fednca.tensorcodec import model_sha256

SMALL = {
    "fednca": dict(input_size=32, steps=(4, 3)),
    "mednca": dict(input_size=32, steps=(3, 3), train_patch=16),
}


def perturbed_model(cfg, *, seed=1, scale=0.05):
    """A model whose last layers are not zero, so that the output depends on every step."""
    model = build(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def torch_logits(model, image, fire1, fire2):
    with torch.no_grad():
        return model(torch.from_numpy(image), masks=(torch.from_numpy(fire1), torch.from_numpy(fire2))).numpy()


@pytest.fixture(scope="module", params=["fednca", "mednca", "fednca-full"])
def exported(request, tmp_path_factory):
    name = request.param.removesuffix("-full")
    cfg = preset(name) if request.param.endswith("-full") else preset(name, **SMALL[name])
    model = perturbed_model(cfg)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    done = export_onnx(model, cfg, path)
    return model, Segmenter.open(path), done


@pytest.mark.parametrize("batch,side_factor", [(1, 1), (3, 1), (2, 2)])
def test_onnxruntime_matches_pytorch_with_the_same_masks(exported, batch, side_factor):
    model, seg, _ = exported
    cfg = model.cfg
    side = cfg.input_size if side_factor == 1 else cfg.input_size // side_factor  # dynamic grid too
    rng = np.random.default_rng(batch)
    image = rng.uniform(-1, 1, (batch, 1, side, side)).astype(np.float32)
    fire1, fire2 = draw_masks(cfg, batch, rng, side=side)
    want = torch_logits(model, image, fire1, fire2)
    got = seg.logits(image, fire1, fire2)
    assert np.abs(want).max() > 0.1  # the perturbation made the output depend on the steps
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_masks_are_inputs_not_baked_into_the_graph(exported):
    model, seg, _ = exported
    rng = np.random.default_rng(7)
    image = rng.uniform(-1, 1, (2, 1, model.cfg.input_size, model.cfg.input_size)).astype(np.float32)
    masks_a = draw_masks(model.cfg, 2, rng)
    masks_b = draw_masks(model.cfg, 2, rng)
    a1, a2, b = (seg.logits(image, *m) for m in (masks_a, masks_a, masks_b))
    np.testing.assert_array_equal(a1, a2)
    assert np.abs(a1 - b).max() > 1e-3
    every, none = (np.ones_like(m) for m in masks_a), (np.zeros_like(m) for m in masks_a)
    assert np.abs(seg.logits(image, *every) - seg.logits(image, *none)).max() > 1e-3
    np.testing.assert_allclose(seg.logits(image, *(np.zeros_like(m) for m in masks_a)), 0.0)  # no update


def test_metadata_carries_the_config_and_the_weights_hash(exported):
    model, seg, done = exported
    proto = onnx.load(str(done.path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[META_FORMAT] == FORMAT
    assert json.loads(meta[META_MODEL]) == json.loads(json.dumps(model.cfg.to_dict()))
    assert meta[META_SHA256] == done.model_sha256 == model_sha256(tensors(model)) == seg.model_sha256
    assert seg.cfg == model.cfg
    assert done.max_error is not None and done.max_error < 1e-3
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Scan") == 2 and len(ops) < 15  # steps loop inside the graph, not unrolled


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = preset(input_size=16, steps=(2, 2))
    weights = {k: v.numpy() for k, v in tensors(build(cfg)).items()}
    weights["stage2.fc1.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ExportError, match=r"stage2\.fc1\.weight: shape \(3, 3\)"):
        export_onnx(weights, cfg, tmp_path / "x.onnx")
    del weights["stage2.fc1.weight"]
    with pytest.raises(ExportError, match=r"stage2\.fc1\.weight: shape None"):
        export_onnx(weights, cfg, tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="configuration differs"):
        export_onnx(build(cfg), preset(input_size=16, steps=(2, 3)), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_export_command_reads_a_model_folder(tmp_path, capsys):
    cfg = preset(input_size=16, steps=(3, 2))
    model = perturbed_model(cfg, seed=4)
    folder = modelfile.save(tmp_path / "model", {k: v.numpy() for k, v in tensors(model).items()}, cfg, round=3)
    assert main(["export", str(folder / modelfile.WEIGHTS), "--out", str(tmp_path / "m.onnx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_sha256"] == model_sha256(tensors(model))
    assert report["max_error"] < 1e-3
    seg = Segmenter.open(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (2, 1, 16, 16)).astype(np.float32)
    masks = draw_masks(cfg, 2, rng)
    np.testing.assert_allclose(seg.logits(image, *masks), torch_logits(model, image, *masks), rtol=1e-4, atol=1e-4)
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "n.onnx")]) == 2
    assert "missing" in capsys.readouterr().err
