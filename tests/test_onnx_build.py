"""The torch-free ONNX builder: its graph reproduces the PyTorch model and the PyTorch exporter's
graph on the same weights, images and fire masks, for both presets, and fednca.segment opens it."""

import json

import numpy as np
import onnx
import pytest
import torch

from fednca import modelfile, onnx_build
from fednca.config import ModelConfig, preset
from fednca.model import build, tensors
from fednca.onnx_export import export_onnx
from fednca.segment import FORMAT, META_FORMAT, META_MODEL, META_SHA256, Segmenter, draw_masks
from fednca.tensorcodec import model_sha256

SMALL = {
    "fednca": dict(input_size=32, steps=(4, 3)),
    "mednca": dict(input_size=32, steps=(3, 3), train_patch=16),
}


def perturbed_weights(cfg, *, seed=1, scale=0.05):
    """Weights whose last layers are not zero, so that the output depends on every step."""
    model = build(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval(), {k: v.numpy() for k, v in tensors(model).items()}


def close_to_float32(got, want):
    """Equal up to float32 rounding of the sums (relative to the largest logit)."""
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * scale)


@pytest.fixture(scope="module", params=["fednca", "mednca", "fednca-full"])
def both(request, tmp_path_factory):
    name = request.param.removesuffix("-full")
    cfg = preset(name) if request.param.endswith("-full") else preset(name, **SMALL[name])
    model, weights = perturbed_weights(cfg)
    folder = tmp_path_factory.mktemp("onnx")
    built = onnx_build.export(weights, cfg, folder / "built.onnx")
    export_onnx(model, cfg, folder / "torch.onnx")
    return model, Segmenter.open(built.path), Segmenter.open(folder / "torch.onnx"), built


@pytest.mark.parametrize("batch,side_factor", [(1, 1), (3, 1), (2, 2)])
def test_built_graph_matches_the_torch_model_and_its_export(both, batch, side_factor):
    model, built, exported, _ = both
    cfg = model.cfg
    side = cfg.input_size // side_factor  # the grid side is dynamic too
    rng = np.random.default_rng(batch)
    image = rng.uniform(-1, 1, (batch, 1, side, side)).astype(np.float32)
    fire1, fire2 = draw_masks(cfg, batch, rng, side=side)
    with torch.no_grad():
        want = model(torch.from_numpy(image), masks=(torch.from_numpy(fire1), torch.from_numpy(fire2))).numpy()
    got = built.logits(image, fire1, fire2)
    assert np.abs(want).max() > 0.1  # the perturbation made the output depend on the steps
    close_to_float32(got, want)
    close_to_float32(got, exported.logits(image, fire1, fire2))


def test_masks_are_inputs(both):
    model, built, _, _ = both
    rng = np.random.default_rng(7)
    image = rng.uniform(-1, 1, (2, 1, model.cfg.input_size, model.cfg.input_size)).astype(np.float32)
    a, b = draw_masks(model.cfg, 2, rng), draw_masks(model.cfg, 2, rng)
    assert np.abs(built.logits(image, *a) - built.logits(image, *b)).max() > 1e-3
    np.testing.assert_allclose(built.logits(image, *(np.zeros_like(m) for m in a)), 0.0)  # no cell updates


def test_the_check_before_writing_uses_the_numpy_model_where_it_covers_the_preset(both):
    model, _, _, built = both
    assert built.checked_against == ("numpy" if model.cfg.perception == "depthwise" else "torch")
    assert built.max_error is not None and built.max_error < 1e-3


def test_metadata_and_signature_are_the_exporters(both):
    model, built, exported, done = both
    proto = onnx.load(str(done.path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[META_FORMAT] == FORMAT
    assert ModelConfig.from_dict(json.loads(meta[META_MODEL])) == model.cfg
    assert meta[META_SHA256] == model_sha256({k: v.numpy() for k, v in tensors(model).items()}) == done.model_sha256
    assert built.cfg == exported.cfg and built.model_sha256 == exported.model_sha256
    signature = lambda s: [(a.name, a.type, a.shape) for a in (*s.session.get_inputs(), *s.session.get_outputs())]
    assert signature(built) == signature(exported)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = preset("fednca", **SMALL["fednca"])
    _, weights = perturbed_weights(cfg)
    weights["stage1.fc0.weight"] = weights["stage1.fc0.weight"][:10]
    with pytest.raises(onnx_build.BuildError, match="stage1.fc0.weight"):
        onnx_build.export(weights, cfg, tmp_path / "m.onnx")
    del weights["stage1.fc0.weight"]
    with pytest.raises(onnx_build.BuildError, match="stage1.fc0.weight"):
        onnx_build.export(weights, cfg, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_the_command_reads_a_model_folder(tmp_path, capsys):
    cfg = preset("fednca", **SMALL["fednca"])
    _, weights = perturbed_weights(cfg)
    modelfile.save(tmp_path / "model", weights, cfg)
    assert onnx_build.main([str(tmp_path / "model"), str(tmp_path / "m.onnx")]) == 0
    assert "matches the numpy model" in capsys.readouterr().out
    assert Segmenter.open(tmp_path / "m.onnx").cfg == cfg
    assert onnx_build.main([str(tmp_path / "missing"), str(tmp_path / "n.onnx")]) == 1
    assert not (tmp_path / "n.onnx").exists()
