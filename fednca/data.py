"""A site's dataset: a folder of ``images/NAME.png`` + ``masks/NAME.png`` pairs.

Images may be PNG or JPEG, any size, grey or colour (colour becomes grey); a mask pixel above 0
is foreground. Every pair is resized to ``size x size`` (image: bilinear, antialiased when it
shrinks; mask: nearest) and held in memory as float32 arrays: images in [-1, 1] (0 -> -1,
full scale -> 1), masks of 0/1. A broken pair raises :class:`~fednca.errors.DataError` naming the
file, or is skipped and counted when asked.

File names may carry a patient prefix, the part before the first ``_`` (``P012_003.png`` belongs
to patient ``P012``); :func:`split` keeps each patient's images on one side.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import atomic
from .errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# What Pillow raises on a file it cannot decode: OSError (unknown format, truncated data, broken
# stream), SyntaxError (malformed PNG chunks), ValueError (bad header values), DecompressionBombError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True, eq=False)
class Dataset:
    images: np.ndarray  # (N, 1, S, S) float32 in [-1, 1]
    masks: np.ndarray  # (N, 1, S, S) float32 of 0.0 / 1.0
    names: tuple[str, ...]  # file name stems, one per image

    def __post_init__(self) -> None:
        n = len(self.names)
        shape = self.images.shape
        if len(shape) != 4 or shape[:2] != (n, 1) or shape[2] != shape[3]:
            raise ValueError(f"images must be (N={n}, 1, S, S), got {self.images.shape}")
        if self.masks.shape != self.images.shape:
            raise ValueError(f"masks {self.masks.shape} and images {self.images.shape} differ in shape")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Dataset":
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return Dataset(images=self.images[idx], masks=self.masks[idx], names=tuple(self.names[i] for i in idx))


def concat(parts: Sequence[Dataset]) -> Dataset:
    """One dataset holding every image of ``parts`` in order (e.g. several sites pooled)."""
    if not parts:
        raise ValueError("nothing to concatenate")
    return Dataset(
        images=np.concatenate([d.images for d in parts]),
        masks=np.concatenate([d.masks for d in parts]),
        names=tuple(n for d in parts for n in d.names),
    )


def from_arrays(images: np.ndarray, masks: np.ndarray, names: Sequence[str]) -> Dataset:
    """A dataset from uint8 images (N, S, S) and boolean masks (N, S, S)."""
    x = np.asarray(images, dtype=np.float32)[:, None] / 127.5 - 1.0
    m = (np.asarray(masks)[:, None] > 0).astype(np.float32)
    return Dataset(images=x.astype(np.float32), masks=m, names=tuple(names))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] back to 0..255 (exact inverse of :func:`from_arrays`)."""
    return np.clip(np.rint((np.asarray(images, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Reading


def _list_images(folder: Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Stem -> file of the images in ``folder``; and (file, why) for entries that cannot be used."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list folder ({e.strerror or e})") from None
    found, bad = classify_names(p.name for p in entries if not p.name.startswith(".") and not p.is_dir())
    return {stem: folder / name for stem, name in found.items()}, [(folder / name, why) for name, why in bad]


def classify_names(names: Iterable[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Stem -> file name of the usable images among ``names`` (sorted), and (name, why) of the rest.

    Pure: the same rules :func:`load_folder` applies to a folder's listing, for checks that list
    a folder without reading its files.
    """
    found: dict[str, str] = {}
    bad: list[tuple[str, str]] = []
    for name in sorted(names):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in IMAGE_SUFFIXES:
            bad.append((name, f"not a PNG or JPEG file (expected {', '.join(IMAGE_SUFFIXES)})"))
        elif stem in found:
            bad.append((name, f"two files named {stem!r} ({found[stem]} and {name})"))
        else:
            found[stem] = name
    return found, bad


@dataclass(frozen=True)
class Pairing:
    """A dataset folder's listing sorted into image/mask pairs and leftovers; no file is read."""

    pairs: tuple[tuple[str, str, str], ...]  # (stem, image file name, mask file name), by stem
    images_without_mask: tuple[str, ...]  # image file names
    masks_without_image: tuple[str, ...]  # mask file names
    unusable: tuple[tuple[str, str], ...]  # ("images/NAME" or "masks/NAME", why)


def pair_names(image_names: Iterable[str], mask_names: Iterable[str]) -> Pairing:
    """Pair the file names of ``images/`` and ``masks/`` by stem, as :func:`load_folder` does."""
    images, bad_images = classify_names(image_names)
    masks, bad_masks = classify_names(mask_names)
    return Pairing(
        pairs=tuple((s, images[s], masks[s]) for s in sorted(images.keys() & masks.keys())),
        images_without_mask=tuple(images[s] for s in sorted(images.keys() - masks.keys())),
        masks_without_image=tuple(masks[s] for s in sorted(masks.keys() - images.keys())),
        unusable=tuple([(f"images/{n}", w) for n, w in bad_images] + [(f"masks/{n}", w) for n, w in bad_masks]),
    )


def list_names(folder: Path) -> list[str]:
    """The file names a dataset sub-folder holds (hidden files and folders left out); DataError if unlistable."""
    try:
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list folder ({e.strerror or e})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding its pixels; DataError naming the file."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def decode(path: Path) -> tuple[int, int]:
    """Decode a file exactly as training reads it; its (width, height), or DataError naming the file."""
    arr = _read_grey(path)
    return int(arr.shape[1]), int(arr.shape[0])


def _read_grey(path: Path) -> np.ndarray:
    """A file as a 2-D float array in [0, 1]; raises DataError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):  # 16- or 32-bit grey (PNG 16-bit)
                arr = np.asarray(img, dtype=np.float64) / 65535.0
            elif img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float64) / 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(f"{path}: unsupported image layout {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: image holds non-finite values")
    return np.clip(arr, 0.0, 1.0)


def _resize(arr: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    if arr.shape == (size, size):
        return arr.astype(np.float32)
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(img.resize((size, size), method), dtype=np.float32)


def _load_pair(image_path: Path, mask_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    image = _read_grey(image_path)
    mask = _read_grey(mask_path) > 0
    if image.shape != mask.shape:
        raise DataError(
            f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path.name} "
            f"is {image.shape[1]}x{image.shape[0]}"
        )
    x = _resize(image, size, nearest=False) * 2.0 - 1.0
    m = _resize(mask.astype(np.float32), size, nearest=True) > 0.5
    return np.clip(x, -1.0, 1.0), m.astype(np.float32)


def load_folder(path: str | os.PathLike, *, size: int, skip_bad: bool = False) -> tuple[Dataset, int]:
    """Read a dataset folder; returns the dataset and how many bad pairs were skipped.

    Without ``skip_bad`` the first bad pair raises DataError naming the file. With it, bad pairs
    are left out and counted; a folder with no usable pair is still an error.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError("size", f"must be a positive integer, got {size!r}")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder missing (a dataset holds images/ and masks/)")
    images, bad = _list_images(image_dir)
    masks, bad_masks = _list_images(mask_dir)
    bad += bad_masks
    bad += [(p, "image has no mask in masks/") for s, p in images.items() if s not in masks]
    bad += [(p, "mask has no image in images/") for s, p in masks.items() if s not in images]
    if bad and not skip_bad:
        p, why = bad[0]
        raise DataError(f"{p}: {why}")
    skipped = len(bad)
    xs: list[np.ndarray] = []
    ms: list[np.ndarray] = []
    names: list[str] = []
    for stem in sorted(images.keys() & masks.keys()):
        try:
            x, m = _load_pair(images[stem], masks[stem], size)
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        xs.append(x)
        ms.append(m)
        names.append(stem)
    if not names:
        raise DataError(f"{root}: no usable image/mask pair" + (f" ({skipped} skipped)" if skipped else ""))
    ds = Dataset(images=np.stack(xs)[:, None], masks=np.stack(ms)[:, None], names=tuple(names))
    return ds, skipped


# ---------------------------------------------------------------------------------------------
# Writing


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise DataError(f"{name!r}: not usable as a file name")


def save_folder(
    data: Dataset | Iterable[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike
) -> list[Path]:
    """Write ``images/NAME.png`` and ``masks/NAME.png`` (0 / 255) under ``path``; returns the images.

    ``data`` is a Dataset or an iterable of (name, uint8 image (S, S), boolean mask (S, S)).
    Each file is written atomically; existing files of the same name are replaced.
    """
    root = Path(path)
    if isinstance(data, Dataset):
        pixels = to_uint8(data.images[:, 0])
        items: Iterable[tuple[str, np.ndarray, np.ndarray]] = zip(data.names, pixels, data.masks[:, 0] > 0.5)
    else:
        items = data
    try:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create dataset folder ({e.strerror or e})") from None
    written: list[Path] = []
    for name, image, mask in items:
        _check_name(name)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 2:
            raise DataError(f"{name}: image must be a 2-D uint8 array, got {image.dtype} {image.shape}")
        if np.shape(mask) != image.shape:
            raise DataError(f"{name}: mask {np.shape(mask)} and image {image.shape} differ in shape")
        target = root / "images" / f"{name}.png"
        try:
            atomic.write_bytes(target, _png(image))
            binary = np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)
            atomic.write_bytes(root / "masks" / f"{name}.png", _png(binary))
        except OSError as e:
            raise DataError(f"{target}: cannot write ({e.strerror or e})") from None
        written.append(target)
    return written


# ---------------------------------------------------------------------------------------------
# Patient-level split


def patient_of(name: str) -> str:
    """The patient a file belongs to: the part of its name before the first ``_`` (else all of it)."""
    stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_SUFFIXES else name
    return stem.split("_", 1)[0]


def split(ds: Dataset, *, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split into (train, test) keeping each patient's images together; deterministic by ``seed``.

    Patients are drawn in a seeded order into the test side until it holds at least
    ``test_fraction`` of the images; the training side keeps at least one patient. With a single
    patient the split falls back to single images. The test side is never empty when N >= 2.
    """
    train_idx, test_idx = split_indices(ds.names, test_fraction=test_fraction, seed=seed)
    return ds.subset(train_idx), ds.subset(test_idx)


def split_indices(names: Sequence[str], *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``names`` of :func:`split`: pure over the names, so a check can
    say what the split will hold out before any image is loaded."""
    if not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ConfigError("test_fraction", f"must be in (0, 1), got {test_fraction!r}")
    n = len(names)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(patient_of(name), []).append(i)
    if len(groups) < 2:  # one patient: no patient-level split exists
        groups = {str(i): [i] for i in range(n)}
    want = max(1, round(test_fraction * n)) if n >= 2 else 0
    rng = np.random.default_rng(seed)
    order = rng.permutation(sorted(groups))
    test: list[int] = []
    for patient in order:
        if len(test) >= want:
            break
        if len(test) + len(groups[patient]) >= n:  # keep something to train on
            continue
        test += groups[patient]
    test_idx = np.array(sorted(test), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(n, dtype=np.int64), test_idx)
    return train_idx, test_idx
