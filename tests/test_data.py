import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fednca.data import Dataset, concat, from_arrays, load_folder, patient_of, save_folder, split, to_uint8
from fednca.errors import ConfigError, DataError


def png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray, *, fmt: str = "PNG") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    (root / "images" / f"{name}{suffix}").write_bytes(png_bytes(image, fmt))
    (root / "masks" / f"{name}.png").write_bytes(png_bytes(mask))


def square(side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    image = np.tile(np.linspace(0, 255, side).astype(np.uint8), (side, 1))
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : side // 2, side // 4 : 3 * side // 4] = 255
    return image, mask


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(3):
        image, mask = square()
        write_pair(tmp_path, f"P{i:03d}_000", image, mask)
    return tmp_path


def test_load_scales_resizes_and_names(tmp_path: Path) -> None:
    image, mask = square(32)
    write_pair(tmp_path, "b", np.stack([image] * 3, -1), mask)  # RGB becomes grey
    write_pair(tmp_path, "a", image[:, :24], mask[:, :24])  # any size, not square
    ds, skipped = load_folder(tmp_path, size=16)
    assert skipped == 0 and ds.names == ("a", "b") and len(ds) == 2
    assert ds.images.shape == ds.masks.shape == (2, 1, 16, 16)
    assert ds.images.dtype == ds.masks.dtype == np.float32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.images[1, 0, 0, 0] == pytest.approx(-1.0, abs=0.06) and ds.images[1, 0, 0, -1] > 0.9
    assert set(np.unique(ds.masks)) == {0.0, 1.0}
    assert ds.masks[1, 0].sum() == pytest.approx(0.125 * 256, abs=8)


def test_jpeg_image_and_any_positive_mask_value(tmp_path: Path) -> None:
    image, mask = square(16)
    write_pair(tmp_path, "x", np.stack([image] * 3, -1), (mask > 0).astype(np.uint8), fmt="JPEG")
    ds, _ = load_folder(tmp_path, size=16)
    assert ds.masks.sum() == (mask > 0).sum()  # mask value 1 counts as foreground


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    masks = rng.random((3, 16, 16)) > 0.5
    ds = from_arrays(images, masks, ["P1_a", "P1_b", "P2_a"])
    written = save_folder(ds, tmp_path / "out")
    assert [p.name for p in written] == ["P1_a.png", "P1_b.png", "P2_a.png"]
    back, skipped = load_folder(tmp_path / "out", size=16)
    assert skipped == 0 and back.names == ds.names
    np.testing.assert_array_equal(to_uint8(back.images[:, 0]), images)
    np.testing.assert_array_equal(back.masks, ds.masks)


def test_save_refuses_unsafe_names(tmp_path: Path) -> None:
    image = np.zeros((8, 8), np.uint8)
    with pytest.raises(DataError, match="file name"):
        save_folder([("../evil", image, image > 0)], tmp_path)


def assert_names(err: pytest.ExceptionInfo, path: Path) -> None:
    assert str(path) in str(err.value)


def test_missing_mask_names_the_image(folder: Path) -> None:
    (folder / "masks" / "P001_000.png").unlink()
    with pytest.raises(DataError, match="no mask") as err:
        load_folder(folder, size=8)
    assert_names(err, folder / "images" / "P001_000.png")


def test_mask_without_image_names_the_mask(folder: Path) -> None:
    (folder / "images" / "P002_000.png").unlink()
    with pytest.raises(DataError, match="no image") as err:
        load_folder(folder, size=8)
    assert_names(err, folder / "masks" / "P002_000.png")


def test_truncated_png_names_the_file(folder: Path) -> None:
    path = folder / "images" / "P000_000.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable") as err:
        load_folder(folder, size=8)
    assert_names(err, path)


def test_garbage_file_names_the_file(folder: Path) -> None:
    path = folder / "masks" / "P002_000.png"
    path.write_bytes(b"not a picture at all")
    with pytest.raises(DataError, match="unreadable") as err:
        load_folder(folder, size=8)
    assert_names(err, path)


def test_size_mismatch_names_the_mask(folder: Path) -> None:
    path = folder / "masks" / "P001_000.png"
    path.write_bytes(png_bytes(np.zeros((10, 12), np.uint8)))
    with pytest.raises(DataError, match="12x10") as err:
        load_folder(folder, size=8)
    assert_names(err, path)


def test_unsupported_file_type_names_the_file(folder: Path) -> None:
    path = folder / "images" / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="PNG or JPEG") as err:
        load_folder(folder, size=8)
    assert_names(err, path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_permissions_name_the_file(folder: Path) -> None:
    path = folder / "images" / "P000_000.png"
    path.chmod(0)
    with pytest.raises(DataError) as err:
        load_folder(folder, size=8)
    assert_names(err, path)


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        load_folder(tmp_path / "nowhere", size=8)
    assert_names(err, tmp_path / "nowhere")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="folder missing") as err:
        load_folder(tmp_path, size=8)
    assert_names(err, tmp_path / "masks")
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no usable") as err:
        load_folder(tmp_path, size=8)
    assert_names(err, tmp_path)


def test_skip_bad_counts_and_keeps_the_good(folder: Path) -> None:
    (folder / "masks" / "P001_000.png").unlink()  # image without mask
    (folder / "masks" / "P009_000.png").write_bytes(png_bytes(np.zeros((16, 16), np.uint8)))  # mask alone
    path = folder / "images" / "P002_000.png"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    ds, skipped = load_folder(folder, size=8, skip_bad=True)
    assert ds.names == ("P000_000",) and skipped == 3


def test_skip_bad_with_nothing_left_is_still_an_error(folder: Path) -> None:
    for p in (folder / "masks").iterdir():
        p.write_bytes(b"broken")
    with pytest.raises(DataError, match=r"no usable image/mask pair \(3 skipped\)"):
        load_folder(folder, size=8, skip_bad=True)


def test_size_must_be_positive(folder: Path) -> None:
    with pytest.raises(ConfigError, match="size"):
        load_folder(folder, size=0)


def tiny(names: list[str]) -> Dataset:
    n = len(names)
    return Dataset(images=np.zeros((n, 1, 4, 4), np.float32), masks=np.zeros((n, 1, 4, 4), np.float32),
                   names=tuple(names))


def test_patient_of() -> None:
    assert patient_of("P012_003.png") == "P012"
    assert patient_of("P012_003") == "P012"
    assert patient_of("s1p004_007") == "s1p004"
    assert patient_of("scan42.png") == "scan42"
    assert patient_of("a_b_c") == "a"


def test_split_keeps_patients_together_and_is_deterministic() -> None:
    names = [f"P{p}_{i}" for p in range(10) for i in range(4)]
    ds = tiny(names)
    train, test = split(ds, test_fraction=0.2, seed=3)
    assert len(train) + len(test) == 40 and len(test) == 8
    assert not {patient_of(n) for n in train.names} & {patient_of(n) for n in test.names}
    again = split(ds, test_fraction=0.2, seed=3)[1]
    assert again.names == test.names
    others = {split(ds, test_fraction=0.2, seed=s)[1].names for s in range(6)}
    assert len(others) > 1


def test_split_never_leaves_test_empty() -> None:
    for names in (["a", "b"], ["P1_1", "P1_2", "P1_3"], ["P1_1", "P1_2", "P2_1"]):
        train, test = split(tiny(names), test_fraction=0.01, seed=0)
        assert len(test) >= 1 and len(train) >= 1
    train, test = split(tiny(["only"]), test_fraction=0.5, seed=0)
    assert len(train) == 1 and len(test) == 0 and test.images.shape == (0, 1, 4, 4)


def test_split_refuses_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="test_fraction"):
        split(tiny(["a", "b"]), test_fraction=1.0, seed=0)


def test_subset_concat_and_shape_checks() -> None:
    ds = tiny(["a", "b", "c"])
    assert ds.subset([2, 0]).names == ("c", "a")
    both = concat([ds, tiny(["d"])])
    assert both.names == ("a", "b", "c", "d") and both.images.shape == (4, 1, 4, 4)
    with pytest.raises(ValueError, match="differ in shape"):
        Dataset(images=np.zeros((1, 1, 4, 4), np.float32), masks=np.zeros((1, 1, 4, 3), np.float32), names=("a",))
