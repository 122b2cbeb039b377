"""`fednca segment`: onnxruntime only, masks at the image's size, NQM flag, clear errors."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from fednca_app.cli import main
from fednca.config import preset
from fednca.errors import DataError
from fednca.metrics import nqm
from fednca.modelfile import ModelFileError
from fednca.onnx_export import export_onnx
from fednca.segment import META_MODEL, Segmenter, draw_masks, mask_at, output_paths, overlay, sigmoid
from test_onnx import perturbed_model, torch_logits

CFG = preset(input_size=32, steps=(4, 3))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    model = perturbed_model(CFG, seed=3)
    export_onnx(model, CFG, folder / "model.onnx")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((45, 70)) * 255).astype(np.uint8), mode="L").save(folder / "grey.png")
    Image.fromarray((rng.random((90, 60, 3)) * 255).astype(np.uint8), mode="RGB").save(folder / "colour.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return model, folder


def segment(folder, *extra, images=("grey.png", "colour.jpg"), capsys):
    argv = ["segment", "--model", str(folder / "model.onnx"), *(str(folder / i) for i in images)]
    rc = main([*argv, "--out", str(folder / "out"), "--json", *extra])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else out.err)


def test_masks_and_overlays_come_back_at_each_images_own_size(model_file, capsys):
    _, folder = model_file
    rc, report = segment(folder, "--seed", "1", capsys=capsys)
    assert rc == 0 and report["passes"] == 10 and report["seed"] == 1
    for r, (w, h) in zip(report["images"], [(70, 45), (60, 90)]):
        assert (r["width"], r["height"]) == (w, h)
        with Image.open(r["mask"]) as mask, Image.open(r["overlay"]) as over:
            assert mask.size == over.size == (w, h)
            assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
            assert over.mode == "RGB"
            assert np.asarray(mask).mean() / 255 == pytest.approx(r["foreground"], abs=1e-6)
        assert r["nqm"] > 0 and r["flagged"] == (r["nqm"] > report["nqm_threshold"])


def test_same_seed_same_result_other_seed_other_spread(model_file, capsys):
    _, folder = model_file
    a = segment(folder, "--seed", "5", capsys=capsys)[1]["images"]
    b = segment(folder, "--seed", "5", capsys=capsys)[1]["images"]
    c = segment(folder, "--seed", "6", capsys=capsys)[1]["images"]
    assert [r["nqm"] for r in a] == [r["nqm"] for r in b]
    assert [r["nqm"] for r in a] != [r["nqm"] for r in c]


def test_flag_follows_the_threshold_and_one_pass_has_no_score(model_file, capsys):
    _, folder = model_file
    low = segment(folder, "--seed", "2", "--threshold", "0", capsys=capsys)[1]
    high = segment(folder, "--seed", "2", "--threshold", "1e9", capsys=capsys)[1]
    single = segment(folder, "--passes", "1", "--threshold", "0", capsys=capsys)[1]
    assert low["flagged"] == 2 and high["flagged"] == 0
    assert all(r["nqm"] is None and not r["flagged"] for r in single["images"])


def test_each_pass_runs_alone_and_matches_pytorch(model_file):
    model, folder = model_file
    seg = Segmenter.open(folder / "model.onnx")
    image = np.random.default_rng(1).uniform(-1, 1, (32, 32)).astype(np.float32)
    got = seg.passes(image, 4, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    want = [torch_logits(model, image[None, None], *draw_masks(CFG, 1, rng)) for _ in range(4)]
    np.testing.assert_allclose(got, torch.sigmoid(torch.from_numpy(np.concatenate(want))).numpy()[:, 0], atol=1e-5)
    assert nqm(got[:, None])[0] > 0
    np.testing.assert_array_equal(seg.passes(image, 2, np.random.default_rng(9)), got[:2])  # passes are independent


def test_segment_never_imports_torch(model_file):
    _, folder = model_file
    code = (
        "import sys, json; from fednca_app.cli import main; "
        f"rc = main(['segment', '--model', {str(folder / 'model.onnx')!r}, {str(folder / 'grey.png')!r}, "
        f"'--out', {str(folder / 'sub')!r}, '--json', '--seed', '0']); "
        "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules}))"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert json.loads(lines[-1]) == {"rc": 0, "torch": False}
    assert json.loads(lines[0])["images"][0]["width"] == 70
    assert (folder / "sub" / "grey_mask.png").exists()


def test_a_file_that_is_not_an_image_is_named(model_file, capsys):
    _, folder = model_file
    rc, err = segment(folder, images=("grey.png", "broken.png"), capsys=capsys)
    assert rc == 2 and "broken.png: unreadable image" in err


def test_model_files_that_are_not_this_models_export_are_named(model_file, tmp_path):
    _, folder = model_file
    not_onnx = tmp_path / "weights.onnx"
    not_onnx.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="weights.onnx: not an ONNX model"):
        Segmenter.open(not_onnx)
    plain = tmp_path / "plain.onnx"  # valid ONNX, not ours
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(plain))
    with pytest.raises(ModelFileError, match="plain.onnx: an ONNX model without FedNCA metadata"):
        Segmenter.open(plain)
    proto = onnx.load(str(folder / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == META_MODEL:
            p.value = json.dumps(preset(input_size=32, steps=(5, 3)).to_dict())
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    with pytest.raises(ModelFileError, match="tampered.onnx: graph inputs/outputs"):
        Segmenter.open(tmp_path / "tampered.onnx")
    with pytest.raises(ModelFileError, match="absent.onnx: cannot read"):
        Segmenter.open(tmp_path / "absent.onnx")


def test_an_output_folder_that_cannot_be_made_is_named(model_file, capsys, tmp_path):
    _, folder = model_file
    (tmp_path / "file").write_text("")
    argv = ["segment", "--model", str(folder / "model.onnx"), str(folder / "grey.png"), "--out"]
    assert main([*argv, str(tmp_path / "file" / "out")]) == 2
    assert "--out: cannot create the folder" in capsys.readouterr().err


def test_two_images_with_one_name_are_refused(tmp_path):
    with pytest.raises(DataError, match="same name as"):
        output_paths([tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"], tmp_path)


def test_mask_resize_overlay_and_sigmoid_known_answers():
    prob = np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)
    np.testing.assert_array_equal(mask_at(prob, (2, 2)), prob > 0.5)
    big = mask_at(prob, (4, 4))
    assert big.shape == (4, 4) and not big[0, 0] and big[3, 3]
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    rgb = overlay(np.full((5, 5), 0.5), mask)
    assert tuple(rgb[2, 2]) == (178, 76, 76)  # inner pixel: 60 % grey + 40 % red
    assert tuple(rgb[1, 1]) == (255, 0, 0) and tuple(rgb[0, 0]) == (128, 128, 128)  # border, outside
    np.testing.assert_allclose(sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


def test_overlay_draws_the_truth_outline_in_green_and_no_line_along_the_frame():
    mask = np.zeros((5, 5), bool)
    mask[:, :3] = True  # cut off by the left edge of the image
    truth = np.zeros((5, 5), bool)
    truth[1:4, 1:4] = True
    rgb = overlay(np.full((5, 5), 0.5), mask, truth=truth)
    assert tuple(rgb[2, 0]) == (178, 76, 76), "the frame is not background: no outline along it"
    assert tuple(rgb[0, 1]) == (178, 76, 76) and tuple(rgb[0, 2]) == (255, 0, 0) and tuple(rgb[2, 2]) == (255, 0, 0)
    assert tuple(rgb[1, 1]) == (0, 220, 0) and tuple(rgb[2, 3]) == (0, 220, 0)  # truth drawn on top
    np.testing.assert_array_equal(rgb, overlay(np.full((5, 5), 0.5), mask, truth=truth))


class NothingFound:
    """A model whose passes all agree that there is (next to) nothing: a near-empty mask."""

    cfg = CFG

    def passes(self, image, passes, rng):
        return np.full((passes, CFG.input_size, CFG.input_size), 0.01, np.float32) + rng.random(
            (passes, CFG.input_size, CFG.input_size), dtype=np.float32) * 1e-3


def test_an_empty_prediction_is_flagged_in_json_and_in_words(model_file, capsys, monkeypatch):
    import fednca_app.commands.segment as command

    _, folder = model_file
    monkeypatch.setattr(command.Segmenter, "open", classmethod(lambda cls, path, threads=1: _opened()))
    rc, report = segment(folder, "--seed", "1", capsys=capsys)
    assert rc == 0 and report["empty"] == 2
    assert all(r["foreground"] == 0 and "empty" in r["flags"] for r in report["images"])
    assert main(["segment", str(folder / "grey.png"), "--model", "x.onnx", "--out", str(folder / "out")]) == 0
    out = capsys.readouterr()
    assert "EMPTY" in out.out and "near-empty" in out.err


def _opened():
    seg = NothingFound()
    seg.model_sha256 = "00" * 32
    return seg


def test_flags_name_empty_and_disagreeing_masks_apart():
    from fednca.segment import EMPTY_FOREGROUND, result_flags

    assert result_flags(0.0, False) == ("empty",) and result_flags(0.3, True) == ("nqm",)
    assert result_flags(EMPTY_FOREGROUND / 2, True) == ("empty", "nqm") and result_flags(0.3, False) == ()


def test_without_a_model_it_says_where_it_looked_and_how_to_point_elsewhere(model_file, capsys, monkeypatch, tmp_path):
    import fednca_app.commands.segment as command

    _, folder = model_file
    monkeypatch.setattr(command, "DEFAULT_MODEL", tmp_path / "state" / "inference" / "model.onnx")
    assert main(["segment", str(folder / "grey.png"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "state" / "inference" / "model.onnx") in err and "--model" in err
