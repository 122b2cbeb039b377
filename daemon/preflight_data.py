"""The dataset half of ``fednca daemon --check-config``: will the trainer load this folder?

The trainer (:func:`fednca.data.load_folder`) reads every pair at the start of each round and
stops at the first bad one unless ``data.skip_bad`` is set; this check finds *all* of them first:

* pairing, pure over the two folders' listings (:func:`fednca.data.pair_names`): images without
  a mask, masks without an image, files that are not PNG or JPEG, two files of one name;
* sizes of every pair from the file headers (cheap: no pixel is decoded);
* decoding, as training decodes: every pair by default, or an evenly spread sample
  (``--check-images sample N``) when a device holds many thousands of images and a quick answer
  is wanted. Decoding every pair costs what one trainer start costs anyway;
* the test split (``data.test_fraction``): how many patients it holds out and how many remain to
  train, computed over the file names with the trainer's own split and seed.

Each problem is an error unless ``data.skip_bad`` is set, when it is a warning (the pair is left
out); a folder with no usable pair is an error either way. Long lists are cut after
:data:`MAX_LISTED` findings of one kind, with a count of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fednca import data as fd
from fednca.checks import Finding, Severity
from fednca.errors import DataError

MAX_LISTED = 20  # findings listed per kind; the rest are counted in one more


@dataclass(frozen=True)
class ImageCheck:
    """Which pairs to decode: every one (``sample`` None) or ``sample`` of them, evenly spread."""

    sample: int | None = None

    def describe(self) -> str:
        return "all" if self.sample is None else f"sample {self.sample}"


@dataclass(frozen=True)
class SplitSummary:
    images: int
    patients: int
    test_images: int
    test_patients: int
    train_images: int
    train_patients: int
    by_patient: bool  # False: one patient, so the split falls back to single images

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def sample_indices(n: int, k: int | None) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (first and last included); all when k is None or >= n."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def summarise_split(names: Sequence[str], *, test_fraction: float, seed: int) -> SplitSummary:
    """What the trainer's split (:func:`fednca.data.split_indices`) does to these pairs."""
    patients = {fd.patient_of(n) for n in names}
    if len(names) < 2:
        return SplitSummary(len(names), len(patients), 0, 0, len(names), len(patients), len(patients) >= 2)
    train, test = fd.split_indices(list(names), test_fraction=test_fraction, seed=seed)
    return SplitSummary(
        images=len(names), patients=len(patients),
        test_images=len(test), test_patients=len({fd.patient_of(names[i]) for i in test}),
        train_images=len(train), train_patients=len({fd.patient_of(names[i]) for i in train}),
        by_patient=len(patients) >= 2,
    )  # fmt: skip


def split_findings(s: SplitSummary, *, test_fraction: float) -> list[Finding]:
    """Problems of the test split: nothing to hold out, a single patient, a lopsided split."""
    key, off = "data.test_fraction", "or set data.test_fraction: 0 (no local test Dice)"
    if s.images < 2:
        return [Finding(key, f"{test_fraction} asks for a test split, but the folder has {s.images} usable pair(s) "
                             "and a split needs at least 2", f"add images of more patients, {off}")]
    if not s.by_patient:
        return [Finding(key, f"{test_fraction} asks for a test split, but all {s.images} images belong to one "
                             "patient (the name's part before the first '_'): the held-out images would come from "
                             "the patient trained on", f"add images of other patients, {off}")]
    share = s.test_images / s.images
    if share > max(2 * test_fraction, test_fraction + 0.2):
        return [Finding(key, f"{test_fraction} holds out {s.test_images} of {s.images} images ({share:.0%}): "
                             f"{s.patients} patients are too few or too uneven to hold out about {test_fraction:.0%}",
                        f"add images of more patients, or lower data.test_fraction", severity="warning")]
    return []


def _cut(findings: list[Finding], what: str, fix: str, severity: Severity) -> list[Finding]:
    if len(findings) <= MAX_LISTED:
        return findings
    rest = len(findings) - MAX_LISTED
    return findings[:MAX_LISTED] + [Finding("data.folder", f"... and {rest} more {what}", fix, severity=severity)]


def pairing_findings(pairing: fd.Pairing, folder: Path, *, skip_bad: bool) -> list[Finding]:
    """Findings of a folder's listing, pure: each unpaired or unusable file named with its fix."""
    severity: Severity = "warning" if skip_bad else "error"
    skip = " (left out: data.skip_bad is true)" if skip_bad else ""
    or_skip = "" if skip_bad else "; or set data.skip_bad: true to train without such files"
    out: list[Finding] = []
    fix = f"add its mask as masks/NAME.png (same name, same size), or remove the image{or_skip}"
    out += _cut([Finding("data.folder", f"image has no mask: {folder / 'masks' / name} is missing{skip}",
                         fix, path=str(folder / "images" / name), severity=severity)
                 for name in pairing.images_without_mask], "images without a mask", fix, severity)
    fix = f"add its image as images/NAME.png, or remove the mask{or_skip}"
    out += _cut([Finding("data.folder", f"mask has no image in images/{skip}", fix,
                         path=str(folder / "masks" / name.split("/")[-1]), severity=severity)
                 for name in pairing.masks_without_image], "masks without an image", fix, severity)
    fix = f"move it out of the dataset folder (only .png, .jpg and .jpeg files belong there){or_skip}"
    out += _cut([Finding("data.folder", f"{why}{skip}", fix, path=str(folder / name), severity=severity)
                 for name, why in pairing.unusable], "unusable files", fix, severity)
    return out


def check_folder(folder: Path, *, skip_bad: bool, test_fraction: float, seed: int, images: ImageCheck,
                 decode: Callable[[Path], tuple[int, int]] = fd.decode,
                 size_of: Callable[[Path], tuple[int, int]] = fd.image_size,
                 ) -> tuple[list[Finding], list[str], dict[str, Any]]:
    """(findings, notes, facts) of a dataset folder; reads headers of every pair, decodes as asked."""
    findings: list[Finding] = []
    listings: dict[str, list[str]] = {}
    for sub in ("images", "masks"):
        try:
            listings[sub] = fd.list_names(folder / sub)
        except DataError as e:
            if not folder.is_dir():
                why = f"folder missing: no dataset folder at {folder}"
                fix = "point data.folder at the folder holding images/ and masks/ (readable by the daemon's user)"
            elif not (folder / sub).is_dir():
                why, fix = "folder missing", f"make it, holding one file per {sub[:-1]}: NAME.png"
            else:
                why, fix = str(e).partition(": ")[2], "let the daemon's user read it"
            findings.append(Finding("data.folder", why, fix, path=str(folder / sub)))
    if findings:
        return findings, [], {}
    pairing = fd.pair_names(listings["images"], listings["masks"])
    findings += pairing_findings(pairing, folder, skip_bad=skip_bad)
    severity: Severity = "warning" if skip_bad else "error"
    or_skip = "" if skip_bad else "; or set data.skip_bad: true to train without it"
    skip = " (left out: data.skip_bad is true)" if skip_bad else ""
    bad: set[str] = set()
    sized: list[Finding] = []
    unreadable: list[Finding] = []
    sizes: dict[str, tuple[int, int]] = {}
    for stem, image_name, mask_name in pairing.pairs:
        image, mask = folder / "images" / image_name, folder / "masks" / mask_name
        try:
            isize, msize = size_of(image), size_of(mask)
        except DataError as e:
            bad.add(stem)
            unreadable.append(_unreadable(e, image, skip, or_skip, severity))
            continue
        sizes[stem] = isize
        if isize != msize:
            bad.add(stem)
            sized.append(Finding("data.folder", f"mask is {msize[0]}x{msize[1]} but its image {image_name} is "
                                 f"{isize[0]}x{isize[1]}{skip}", f"export the mask at the image's size{or_skip}",
                                 path=str(mask), severity=severity))
    candidates = [p for p in pairing.pairs if p[0] not in bad]
    chosen = sample_indices(len(candidates), images.sample)
    for i in chosen:
        stem, image_name, mask_name = candidates[i]
        for path in (folder / "images" / image_name, folder / "masks" / mask_name):
            try:
                decode(path)
            except DataError as e:
                bad.add(stem)
                unreadable.append(_unreadable(e, path, skip, or_skip, severity))
                break
    findings += _cut(sized, "pairs of different sizes", f"export each mask at its image's size{or_skip}", severity)
    findings += _cut(unreadable, "unreadable files", f"export the files again{or_skip}", severity)
    usable = [p[0] for p in pairing.pairs if p[0] not in bad]
    notes = [f"data: {len(pairing.pairs)} image/mask pair(s) in {folder}, {len(usable)} usable; decoded "
             f"{len(chosen)} of {len(candidates)} ({images.describe()})"]
    facts: dict[str, Any] = {"pairs": len(pairing.pairs), "usable": len(usable), "decoded": len(chosen),
                             "check_images": images.describe()}
    if not usable:
        findings.append(Finding("data.folder", "no usable image/mask pair" + (" (the folder is empty)" if not (
            listings["images"] or listings["masks"]) else ""), "put images/NAME.png with masks/NAME.png "
            f"(same name, same size) in {folder}", path=str(folder)))
        return findings, notes, facts
    if test_fraction > 0:
        s = summarise_split(usable, test_fraction=test_fraction, seed=seed)
        facts["split"] = s.to_dict()
        findings += split_findings(s, test_fraction=test_fraction)
        if s.images >= 2:
            notes.append(f"test split (data.test_fraction {test_fraction}): holds out {s.test_patients} patient(s) "
                         f"({s.test_images} images); {s.train_patients} patient(s) ({s.train_images} images) "
                         "remain to train")
    return findings, notes, facts


def _unreadable(e: DataError, path: Path, skip: str, or_skip: str, severity: Severity) -> Finding:
    at, _, why = str(e).partition(": ")  # DataError names the file first
    return Finding("data.folder", f"{why}{skip}", f"export the file again (it is truncated or not an image), "
                   f"or remove the pair{or_skip}", path=at or str(path), severity=severity)
