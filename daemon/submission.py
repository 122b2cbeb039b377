"""From the trainer's checkpoint to a signed and sealed update, without PyTorch.

The trainer (:mod:`fednca_daemon.worker`) writes :meth:`fednca.train.Trainer.checkpoint` bytes
after every chunk, with these ``extra`` fields:

    round, base_sha256   the round and global model the current training belongs to
    round_start          the trainer's step count when that round began
    planned              optimiser steps planned for the round (local epochs x batches)
    loss_sum, loss_steps sum and count of training losses in the round
    dice_global          mean test Dice of the global model on the site's held-out images (optional)
    dice_local           the same for the local model once the planned steps are done (optional)

The daemon reads the model weights and these fields with safetensors' numpy reader, takes the
difference to the announced global model and makes the update with :func:`fednca.wire.make_update`.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from nacl.public import PublicKey
from nacl.signing import SigningKey
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from fednca import checkpoint_format
from fednca.quantise import quantise_with_feedback
from fednca.wire import Announcement, Reason, WireError, make_update

from .errors import CheckpointMismatch

# Both trainers' checkpoints hold the same fields read here (steps, samples, extra) and the weights
# under model/.
_METRICS = ("train_loss", "dice_global", "dice_local")


@dataclass(frozen=True)
class Progress:
    round: int
    base_sha256: str
    steps: int  # optimiser steps done in this round
    planned: int
    samples: int  # training images (the FedAvg weight)
    metrics: Mapping[str, float]
    weights: Mapping[str, np.ndarray]  # the local model, float32


def _metadata(blob: bytes) -> dict[str, Any]:
    n = int.from_bytes(blob[:8], "little")
    if len(blob) < 8 + n:
        raise ValueError("header longer than the file")
    head = json.loads(blob[8 : 8 + n])
    meta = json.loads(head.get("__metadata__", {}).get("fednca", "null"))
    if not isinstance(meta, dict) or meta.get("format") not in checkpoint_format.FORMATS:
        raise ValueError("not a fednca checkpoint")
    return meta


def read_progress(blob: bytes) -> Progress:
    """Round, progress, metrics and local weights of a trainer checkpoint."""
    try:
        meta = _metadata(blob)
        extra = meta["extra"]
        steps = int(meta["steps"]) - int(extra["round_start"])
        metrics = {"train_loss": extra["loss_sum"] / extra["loss_steps"]} if extra.get("loss_steps") else {}
        for name in ("dice_global", "dice_local"):
            if extra.get(name) is not None:
                metrics[name] = float(extra[name])
        progress = Progress(
            round=int(extra["round"]),
            base_sha256=str(extra["base_sha256"]),
            steps=steps,
            planned=int(extra["planned"]),
            samples=int(meta["samples"]),
            metrics={k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
            weights={},
        )
        arrays = st_load(blob)
    except (ValueError, KeyError, TypeError, ZeroDivisionError, SafetensorError) as e:
        raise CheckpointMismatch(f"checkpoint unreadable: {e}") from None
    weights = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    return Progress(**{**progress.__dict__, "weights": weights})


def progress_of(blob: bytes | None, *, round: int, base_sha256: str) -> tuple[int, int | None]:
    """(steps done, planned) of ``round`` according to a checkpoint; (0, None) if it holds another."""
    if blob is None:
        return 0, None
    try:
        meta = _metadata(blob)
        extra = meta["extra"]
        if extra.get("round") != round or extra.get("base_sha256") != base_sha256:
            return 0, None
        return int(meta["steps"]) - int(extra["round_start"]), int(extra["planned"])
    except (ValueError, KeyError, TypeError):
        return 0, None


def checkpoint_damage(blob: bytes) -> str | None:
    """Why a checkpoint cannot be read at all (its header is garbled), or None: a damaged one is
    moved aside rather than trained on or submitted."""
    try:
        meta = _metadata(blob)
        if not isinstance(meta.get("extra"), dict):
            raise ValueError("no training fields")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
        return str(e)[:120] or type(e).__name__
    return None


@dataclass
class ErrorFeedback:
    """The residual a q8 update adds to its delta (``residual``, None for none) and, after
    :func:`build_update`, the one it leaves for the next (``left``); see :mod:`fednca.quantise`."""

    residual: Mapping[str, np.ndarray] | None = None
    left: dict[str, np.ndarray] | None = None


def build_update(
    *,
    announcement: Announcement,
    checkpoint: bytes,
    site: str,
    signing_key: SigningKey,
    coordinator_box: PublicKey,
    dtype: str = "float16",
    feedback: ErrorFeedback | None = None,
) -> tuple[str, bytes, Progress]:
    """(update id, sealed update, progress) for the announced round from the trainer's checkpoint.

    A q8 update quantises the delta plus ``feedback.residual`` and leaves the new residual in
    ``feedback.left``; without ``feedback`` it is quantised alone."""
    h = announcement.header
    progress = read_progress(checkpoint)
    if progress.round != h.round or progress.base_sha256 != h.model_sha256:
        raise CheckpointMismatch(f"checkpoint is for round {progress.round} (model {progress.base_sha256[:12]}), "
                                 f"not round {h.round} (model {h.model_sha256[:12]})")
    if progress.steps < 1:
        raise CheckpointMismatch(f"checkpoint of round {h.round} holds no training step")
    if set(progress.weights) != set(announcement.tensors):
        raise CheckpointMismatch("checkpoint weights do not match the announced model's tensors")
    delta = {k: progress.weights[k].astype(np.float32) - announcement.tensors[k] for k in announcement.tensors}
    sent: Any = delta
    if dtype == "q8":
        sent, left = quantise_with_feedback(delta, None if feedback is None else feedback.residual)
        if feedback is not None:
            feedback.left = left
    metrics = {k: progress.metrics[k] for k in _METRICS if k in progress.metrics}
    update_id = secrets.token_hex(16)
    fields: dict[str, Any] = dict(
        federation=h.federation, site=site, round=h.round, base_sha256=h.model_sha256, update_id=update_id,
        samples=progress.samples, steps=progress.steps, partial=progress.steps < progress.planned,
        metrics=metrics, delta=sent, signing_key=signing_key, coordinator_box=coordinator_box,
    )
    try:
        payload = make_update(**fields, dtype=dtype)
    except WireError as e:
        if e.reason != Reason.NON_FINITE or dtype == "float32":
            raise
        payload = make_update(**fields, dtype="float32")  # a delta beyond float16's range
    return update_id, payload, progress
