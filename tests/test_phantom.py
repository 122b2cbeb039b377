import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fednca_app import cli
from fednca.data import concat, from_arrays, load_folder, patient_of, split, to_uint8
from fednca.errors import ConfigError
from fednca.metrics import dice
from fednca.phantom import SITES, best_threshold_dice, frame_name, generate, phantom_dataset, site_shift


def test_same_seed_same_frame_and_other_seeds_differ() -> None:
    image, mask = generate(site=1, index=5, seed=7)
    again, again_mask = generate(site=1, index=5, seed=7)
    np.testing.assert_array_equal(image, again)
    np.testing.assert_array_equal(mask, again_mask)
    assert not np.array_equal(image, generate(site=1, index=5, seed=8)[0])
    assert not np.array_equal(image, generate(site=1, index=6, seed=7)[0])


@pytest.mark.parametrize("size", [32, 64, 96])
def test_shapes_and_dtypes(size: int) -> None:
    image, mask = generate(site=0, index=0, size=size)
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == np.uint8 and mask.dtype == bool


def test_sites_differ() -> None:
    shifts = [site_shift(s) for s in range(5)]
    assert len(set(shifts)) == 5 and tuple(shifts) == SITES
    for a in range(5):
        for b in range(a + 1, 5):
            fields = [f.name for f in dataclasses.fields(SITES[0])]
            changed = [f for f in fields if getattr(shifts[a], f) != getattr(shifts[b], f)]
            assert len(changed) >= 4, (a, b, changed)
    means = [np.mean([generate(site=s, index=i)[0].mean() for i in range(4)]) for s in range(5)]
    assert max(means) - min(means) > 5  # gain and dynamic range show in the pixels


def test_any_site_number_works_and_is_deterministic() -> None:
    for site in (5, 17, -3, 2**40):
        assert site_shift(site) == site_shift(site)
        image, mask = generate(site=site, index=0)
        assert image.shape == (64, 64) and mask.any()
    assert site_shift(5) != site_shift(6)


@pytest.mark.parametrize(
    "field, value",
    [("depth_cm", 0.0), ("speckle", -0.1), ("sector_deg", 180.0), ("tilt_deg", 60.0), ("noise", float("nan"))],
)
def test_site_shift_refuses_bad_knobs(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(SITES[0], **{field: value})


def test_generate_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="index"):
        generate(site=0, index=-1)
    with pytest.raises(ConfigError, match="size"):
        generate(site=0, index=0, size=4)


def test_masks_are_plausible_and_inside_the_fan() -> None:
    for site in range(5):
        for index in range(0, 40, 5):
            image, mask = generate(site=site, index=index)
            area = mask.mean()
            assert 0.03 < area < 0.45, (site, index, area)
            assert image[0, 0] == 0 and image[0, -1] == 0  # top corners lie outside the fan
            assert not mask[:4].any()  # the target lies below the body wall
            assert image[mask].mean() > 40  # and inside the field of view, not in the black


def test_frames_of_one_patient_share_the_body() -> None:
    masks = np.stack([generate(site=0, index=i)[1] for i in range(16)])  # patients 0 and 1
    same = dice(masks[1:8], np.repeat(masks[:1], 7, 0)).mean()
    other = dice(masks[8:16], np.repeat(masks[:1], 8, 0)).mean()
    assert same > other


def test_phantom_dataset_matches_generate_and_is_named_by_patient() -> None:
    ds = phantom_dataset(site=3, count=4, size=32, seed=2, start=14)
    assert len(ds) == 4 and ds.images.shape == (4, 1, 32, 32) and ds.images.dtype == np.float32
    assert ds.names == ("s3p001_006", "s3p001_007", "s3p002_000", "s3p002_001")
    image, mask = generate(site=3, index=15, size=32, seed=2)
    np.testing.assert_array_equal(to_uint8(ds.images[1, 0]), image)
    np.testing.assert_array_equal(ds.masks[1, 0] > 0.5, mask)
    assert patient_of(frame_name(3, 15)) == "s3p001"


def test_intensity_threshold_cannot_segment_the_target() -> None:
    train = [phantom_dataset(site=s, count=12, seed=1) for s in range(5)]
    test = [phantom_dataset(site=s, count=6, seed=1, start=500) for s in range(5)]
    result = best_threshold_dice(concat(train), concat(test))
    assert result["test_dice"] <= 0.5 and result["train_dice"] <= 0.5


def test_best_threshold_finds_a_separable_target() -> None:
    rng = np.random.default_rng(0)
    masks = rng.random((6, 16, 16)) > 0.7
    bright = np.where(masks, 200, rng.integers(0, 100, masks.shape)).astype(np.uint8)
    ds = from_arrays(bright, masks, [str(i) for i in range(6)])
    result = best_threshold_dice(ds, ds)
    assert result["direction"] == "above" and result["test_dice"] == pytest.approx(1.0)
    dark = from_arrays(255 - bright, masks, ds.names)
    assert best_threshold_dice(dark, dark)["direction"] == "below"


def test_cli_writes_a_readable_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "site2"
    argv = ["phantom", "--site", "2", "--count", "10", "--out", str(out), "--size", "32", "--seed", "4"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 image/mask pairs of site 2 (2 patients" in printed and str(out) in printed
    ds, skipped = load_folder(out, size=32)
    assert skipped == 0 and ds.names[0] == "s2p000_000" and len(ds) == 10
    expected = phantom_dataset(site=2, count=10, size=32, seed=4)
    np.testing.assert_array_equal(ds.images, expected.images)
    np.testing.assert_array_equal(ds.masks, expected.masks)
    train, test = split(ds, test_fraction=0.2, seed=0)
    assert {patient_of(n) for n in test.names} == {"s2p000"} or {patient_of(n) for n in test.names} == {"s2p001"}


def test_cli_refuses_a_bad_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["phantom", "--site", "0", "--count", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--count" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
