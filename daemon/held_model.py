"""What a site keeps for deltas: the global model it holds, and the residual of its q8 updates.

``model.safetensors`` is the model of the stored announcement (``announcement.bin``), written
before it. A round announced as a delta (docs/wire.md) is rebuilt from it, and the trainer checks
it against the announcement's signed sha256 again before training, so a file changed on disk can
only make the site fetch the whole model, never train from another model.

``residual.safetensors`` is what 8-bit quantisation left out of the site's last q8 update (error
feedback, :mod:`fednca.quantise`): added to the next update's delta, so the coordinator receives
the site's progress in full over the rounds. It is written after the update is stored in the
outbox. Losing it (a crash between the two writes, a damaged file) costs one round's rounding, at
most half a quantisation step per value; it is never a reason to refuse or delay an update.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from fednca.tensorcodec import WireError, read_document, write_document

from .outbox import StateFolder

log = logging.getLogger("fednca.daemon")

MODEL_FILE = "model.safetensors"
RESIDUAL_FILE = "residual.safetensors"
_LIMIT = 64 << 20


def model_path(folder: StateFolder) -> Path:
    return folder.path / MODEL_FILE


def residual_path(folder: StateFolder) -> Path:
    return folder.path / RESIDUAL_FILE


def _tensors(path: Path, folder: StateFolder) -> tuple[dict[str, str], dict[str, np.ndarray]] | None:
    try:
        raw = folder.read(path, limit=_LIMIT)
        if raw is None:
            return None
        doc = read_document(raw)
        if any(e.dtype != "F32" for e in doc.entries):
            return None
        return doc.metadata, {e.name: np.array(doc.array(e)) for e in doc.entries}
    except (WireError, OSError, ValueError) as e:
        log.warning("%s: not readable (%s); it is not used", path, e)
        return None


def load_held(folder: StateFolder) -> dict[str, np.ndarray] | None:
    """The model the site holds, or None (none yet, or unreadable: the whole model is fetched)."""
    got = _tensors(model_path(folder), folder)
    return None if got is None else got[1]


def held_models(folder: StateFolder, *also: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The models an announcement may be a delta from: ``also`` (those in memory), then the file."""
    found = [m for m in also if m is not None]
    on_disk = load_held(folder)
    return found + ([on_disk] if on_disk is not None else [])


def save_held(folder: StateFolder, tensors: Mapping[str, Any]) -> None:
    """Write the held model (raises OSError like the other state files)."""
    data = write_document({k: np.asarray(v, np.float32) for k, v in tensors.items()}, {})
    folder.write_file(model_path(folder), data)


def load_residual(folder: StateFolder, *, round: int) -> dict[str, np.ndarray] | None:
    """The residual left by an update of a round before ``round``, or None."""
    got = _tensors(residual_path(folder), folder)
    if got is None:
        return None
    meta, residual = got
    made = meta.get("round", "")
    if not made.isdigit() or int(made) >= round:  # a round submitted again: its residual is not added twice
        return None
    return residual


def save_residual(folder: StateFolder, residual: Mapping[str, np.ndarray], *, round: int) -> None:
    """Keep the residual of the update of ``round``; a failure is logged (see the module's text)."""
    try:
        folder.write_file(residual_path(folder), write_document(dict(residual), {"round": str(round)}))
    except OSError as e:
        log.warning("the quantisation residual of round %d was not kept (%s): the next update leaves it out",
                    round, e)
