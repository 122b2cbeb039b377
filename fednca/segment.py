"""Segmentation on a device with onnxruntime, numpy and Pillow: PyTorch is never imported here.

An image is decoded and resized exactly as for training (:mod:`fednca.data`), run through the
exported graph (:mod:`fednca.onnx_export`) in ``passes`` stochastic passes, and the sigmoid outputs
are averaged; the mask is the mean probability above 0.5 (logit 0), resized back to the image's own
size. The spread between passes is the image's NQM quality score (:func:`fednca.metrics.nqm`); an
image whose NQM is above a threshold is flagged: do not trust that mask without a look.

Batch statistics: the model normalises with the statistics of its batch, also at inference. Each
pass runs on its own, a batch of one: the statistics are those of that one pass of that one image,
so the passes are independent draws (which is what their spread, the NQM, assumes), an image's
mask never depends on which other images were segmented with it, nor on how many passes were
asked for. It is also the fastest and leanest way here: ten batches of one ran faster than one
batch of ten and peaked at about half the memory (docs/inference.md). :func:`fednca.train.evaluate` batches
the passes of an image instead; the statistics then also pool the passes, a small difference.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from . import atomic
from .config import ModelConfig
from .data import _read_grey, _resize  # the very decoding and resizing that training used
from .errors import ConfigError, DataError
from .metrics import nqm
from .modelfile import ModelFileError

if TYPE_CHECKING:
    import onnxruntime as ort

# The contract between the exporter and this module.
FORMAT = "fednca-scan/1"
META_FORMAT, META_MODEL, META_VERSION = "fednca.format", "fednca.model", "fednca.version"
META_SHA256 = "fednca.model_sha256"  # fednca.tensorcodec.model_sha256 of the weights
INPUTS = ("image", "fire1", "fire2")
OUTPUT = "logits"

DEFAULT_PASSES = 10
# NQM above which an image is flagged. On 80 held-out phantom frames of five sites, a briefly
# trained model's NQM tracked its Dice (correlation -0.79): the 14 frames above 0.2 had a mean
# Dice of 0.71 against 0.87 for the rest, every noise or blank image was flagged (even at 0.3),
# while 0.1 flagged more than half of the frames. Erring towards a second look suits a clinic;
# calibrate it on a site's own images as docs/inference.md shows.
DEFAULT_NQM_THRESHOLD = 0.2
# A mask covering less than this fraction of the image is flagged "empty": the model found (next to)
# nothing. NQM alone cannot say so: a near-empty prediction scores high for its small mean, the
# same as a mask the passes disagree on, and a reader must tell "nothing here" from "unsure".
EMPTY_FOREGROUND = 0.005
MAX_MODEL_BYTES = 64 << 20



def draw_masks(
    cfg: ModelConfig, batch: int, rng: np.random.Generator, *, side: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fire masks of both stages for ``batch`` images of ``side`` (default: the input size)."""
    side = cfg.input_size if side is None else side
    small = side // cfg.pool
    fire1 = rng.random((cfg.steps[0], batch, 1, small, small), dtype=np.float32) < cfg.fire_rate
    fire2 = rng.random((cfg.steps[1], batch, 1, side, side), dtype=np.float32) < cfg.fire_rate
    return fire1, fire2


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


class Passes(Protocol):
    """What :func:`segment_file` needs of a model: its configuration and stochastic passes."""

    cfg: ModelConfig

    def passes(self, image: np.ndarray, passes: int, rng: np.random.Generator) -> np.ndarray: ...


class Segmenter:
    """An exported model opened with onnxruntime, its signature checked."""

    def __init__(self, *, session: ort.InferenceSession, cfg: ModelConfig, model_sha256: str, path: Path) -> None:
        self.session, self.cfg, self.model_sha256, self.path = session, cfg, model_sha256, path

    @classmethod
    def open(cls, path: str | Path, *, threads: int = 1) -> "Segmenter":
        """Load ``path``; raises :class:`ModelFileError` naming it when it is not this model's export."""
        import onnxruntime as ort  # here, so that the file functions below serve other backends too

        errors = ort.capi.onnxruntime_pybind11_state
        load_errors = (errors.Fail, errors.InvalidArgument, errors.InvalidGraph, errors.InvalidProtobuf,
                       errors.NoSuchFile, errors.NotImplemented, errors.RuntimeException)
        path = Path(path)
        try:
            if path.stat().st_size > MAX_MODEL_BYTES:
                raise ModelFileError(f"{path}: larger than {MAX_MODEL_BYTES >> 20} MiB, not an exported model")
            data = path.read_bytes()
        except OSError as e:
            raise ModelFileError(f"{path}: cannot read ({e.strerror})") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except load_errors as e:
            raise ModelFileError(f"{path}: not an ONNX model onnxruntime can load ({str(e).splitlines()[0]})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if META_FORMAT not in meta:
            raise ModelFileError(f"{path}: an ONNX model without FedNCA metadata (write it with 'fednca export')")
        if meta[META_FORMAT] != FORMAT:
            raise ModelFileError(f"{path}: graph format {meta[META_FORMAT]!r}, this version reads {FORMAT!r}")
        try:
            cfg = ModelConfig.from_dict(json.loads(meta.get(META_MODEL, "")))
        except (json.JSONDecodeError, ConfigError) as e:
            raise ModelFileError(f"{path}: bad model configuration in its metadata ({e})") from None
        _check_signature(session, cfg, path)
        return cls(session=session, cfg=cfg, model_sha256=meta.get(META_SHA256, ""), path=path)

    def logits(self, image: np.ndarray, fire1: np.ndarray, fire2: np.ndarray) -> np.ndarray:
        """Raw graph call: image (B, 1, S, S) in [-1, 1] and both stages' masks -> logits (B, 1, S, S)."""
        return self.session.run([OUTPUT], dict(zip(INPUTS, (image, fire1, fire2))))[0]

    def passes(self, image: np.ndarray, passes: int, rng: np.random.Generator) -> np.ndarray:
        """Sigmoid outputs (passes, S, S) of one image (S, S) in [-1, 1], each pass a batch of one."""
        x = image.astype(np.float32)[None, None]
        out = np.empty((passes,) + image.shape, np.float32)
        for i in range(passes):
            out[i] = sigmoid(self.logits(x, *draw_masks(self.cfg, 1, rng, side=image.shape[-1])))[0, 0]
        return out


def _check_signature(session: ort.InferenceSession, cfg: ModelConfig, path: Path) -> None:
    want = {
        INPUTS[0]: ("tensor(float)", (None, 1, None, None)),
        INPUTS[1]: ("tensor(bool)", (cfg.steps[0], None, 1, None, None)),
        INPUTS[2]: ("tensor(bool)", (cfg.steps[1], None, 1, None, None)),
        OUTPUT: ("tensor(float)", (None, 1, None, None)),
    }
    got = {a.name: (a.type, tuple(d if isinstance(d, int) else None for d in a.shape))
           for a in (*session.get_inputs(), *session.get_outputs())}
    if got != want:
        raise ModelFileError(f"{path}: graph inputs/outputs {got} do not match its metadata's model {want}")


@dataclass(frozen=True)
class ImageResult:
    image: str
    mask: str
    overlay: str
    width: int
    height: int
    foreground: float  # fraction of the image's pixels in the mask
    nqm: float | None  # None with a single pass
    flagged: bool  # nqm above the threshold
    seconds: float  # model passes only (decoding and writing excluded)
    flags: tuple[str, ...] = ()  # "empty": foreground below EMPTY_FOREGROUND; "nqm": flagged

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_paths(images: Sequence[Path], out: Path) -> list[tuple[Path, Path]]:
    """(mask, overlay) file per image; two images that would write the same file are refused."""
    seen: dict[str, Path] = {}
    paths = []
    for image in images:
        if image.stem in seen:
            raise DataError(f"{image}: same name as {seen[image.stem]}; their masks would overwrite each other")
        seen[image.stem] = image
        paths.append((out / f"{image.stem}_mask.png", out / f"{image.stem}_overlay.png"))
    return paths


def segment_file(
    seg: Passes,
    image_path: Path,
    mask_path: Path,
    overlay_path: Path,
    *,
    passes: int,
    rng: np.random.Generator,
    nqm_threshold: float,
    clock: Callable[[], float] = time.perf_counter,
) -> ImageResult:
    """Segment one image file, write its mask and overlay PNGs, and score it."""
    grey = _read_grey(image_path)  # (H, W) in [0, 1]; DataError naming the file
    size = seg.cfg.input_size
    x = np.clip(_resize(grey, size, nearest=False) * 2.0 - 1.0, -1.0, 1.0)
    start = clock()
    probs = seg.passes(x, passes, rng)  # (passes, S, S)
    seconds = clock() - start
    score = float(nqm(probs[:, None])[0]) if passes > 1 else None
    mask = mask_at(probs.mean(0), grey.shape)
    atomic.write_bytes(mask_path, _png(np.where(mask, 255, 0).astype(np.uint8)))
    atomic.write_bytes(overlay_path, _png(overlay(grey, mask)))
    return ImageResult(
        image=str(image_path), mask=str(mask_path), overlay=str(overlay_path),
        width=grey.shape[1], height=grey.shape[0], foreground=round(float(mask.mean()), 6),
        nqm=None if score is None else round(score, 6), flagged=score is not None and score > nqm_threshold,
        seconds=round(seconds, 6),
        flags=result_flags(float(mask.mean()), score is not None and score > nqm_threshold),
    )


def result_flags(foreground: float, nqm_flagged: bool) -> tuple[str, ...]:
    """What a reader must know before trusting a mask: near-empty, and/or passes that disagree."""
    return (("empty",) if foreground < EMPTY_FOREGROUND else ()) + (("nqm",) if nqm_flagged else ())


def mask_at(probability: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The mean probability map resized (bilinear) to ``shape`` = (H, W), then above 0.5."""
    if probability.shape != shape:
        img = Image.fromarray(probability.astype(np.float32), mode="F")
        probability = np.asarray(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))
    return probability > 0.5


RED, GREEN = (255, 0, 0), (0, 220, 0)


def outline(mask: np.ndarray) -> np.ndarray:
    """The mask pixels that touch a background pixel (4-neighbours); the image's own edge is not
    background, so a mask cut off by the frame has no line along the frame."""
    inner = mask.copy()
    padded = np.pad(mask, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        inner &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return mask & ~inner


def overlay(grey: np.ndarray, mask: np.ndarray, *, alpha: float = 0.4, truth: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: the image in grey (values in [0, 1]), the mask tinted red and its outline drawn in
    full red; with ``truth``, its outline in green on top, for figures that compare with ground
    truth. The one way masks are drawn, by ``fednca segment`` and by the training figures alike."""
    base = np.repeat((np.clip(grey, 0.0, 1.0) * 255.0)[..., None], 3, axis=2)
    red = np.array(RED, np.float64)
    out = np.where(mask[..., None], (1 - alpha) * base + alpha * red, base)
    out[outline(mask)] = red
    if truth is not None:
        out[outline(truth)] = GREEN
    return np.rint(out).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
