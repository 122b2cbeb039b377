"""The global model as sites receive it: whole, or as an 8-bit delta from the previous round's.

With ``model_delta: q8`` (coordinator.yaml) the coordinator *defines* each new global model as the
previous one plus a dequantised q8 delta (:mod:`fednca.quantise`): the aggregate minus the
previous model, plus the residual that earlier rounds' quantisation left out (error feedback),
quantised per tensor. Sites that hold the previous model rebuild the new one with the same float32
operations and check it against the signed sha256, so every party trains from the same bytes,
and the quantisation error does not add up over rounds: the residual travels in the next delta.

Each round's delta is written to ``deltas/<round>.safetensors`` in the store (atomically, before
the model it defines is saved) with the residual it leaves, so a coordinator restarted at any
instant announces the same delta again, and the residual survives restarts. A delta whose model
or base is not the one being announced (a rollback, a model saved before this was switched on)
is not used: the round then travels whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fednca import wire_q8
from fednca.atomic import write_bytes
from fednca.quantise import Quantised, apply, quantise_with_feedback
from fednca.tensorcodec import WireError, model_sha256, read_document, write_document
from fednca.wire_envelope import failer

from .global_model import GlobalModel
from .store import RoundStore

MODEL_DELTAS = ("off", "q8")
_RESIDUAL = "residual."


@dataclass(frozen=True)
class Delta:
    """A stored round delta: the model it applies to, the model it gives, the quantised values."""

    base_sha256: str
    model_sha256: str
    quantised: Quantised
    residual: Mapping[str, np.ndarray]


class Downlink:
    """Defines and keeps the deltas of one federation's global models (see the module's text)."""

    def __init__(self, *, store: RoundStore, encoding: str = "off") -> None:
        if encoding not in MODEL_DELTAS:
            raise ValueError(f"model delta must be one of {MODEL_DELTAS}, got {encoding!r}")
        self._store = store
        self.encoding = encoding

    def path(self, round: int):  # noqa: ANN201 - a Path
        return self._store.folder / "deltas" / f"{round}.safetensors"

    def define(self, *, round: int, previous: GlobalModel, candidate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global model of ``round``: ``candidate`` as it reaches the sites.

        Off: ``candidate`` itself. q8: the previous model plus the quantised delta (with the
        residual the delta of ``round - 1`` left), written down first; an unchanged candidate (an
        aggregate refused) stays exactly the previous model and the residual waits.
        """
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in candidate.items()}
        if self.encoding == "off" or not previous.tensors:
            return arrays
        earlier = self.load(round - 1)
        residual = None if earlier is None or earlier.model_sha256 != previous.sha256 else earlier.residual
        if model_sha256(arrays) == previous.sha256:  # kept: the very same bytes, a zero delta
            quantised = Quantised(values={k: np.zeros(v.shape, np.int8) for k, v in arrays.items()},
                                  scales={k: np.float32(0) for k in arrays})
            kept = dict(residual) if residual is not None else {k: np.zeros_like(v) for k, v in arrays.items()}
            model = arrays
        else:
            change = {k: arrays[k] - np.asarray(previous.tensors[k], np.float32) for k in arrays}
            quantised, kept = quantise_with_feedback(change, residual)
            model = apply(previous.tensors, quantised.dequantised())
        self._save(round, Delta(base_sha256=previous.sha256, model_sha256=model_sha256(model),
                                quantised=quantised, residual=kept))
        return model

    def announced(self, round: int, model: GlobalModel) -> tuple[str, Quantised] | None:
        """(base sha256, delta) to announce ``round``'s ``model`` with, or None to send it whole."""
        if self.encoding == "off":
            return None
        delta = self.load(round)
        if delta is None or delta.model_sha256 != model.sha256:
            return None
        return delta.base_sha256, delta.quantised

    def load(self, round: int) -> Delta | None:
        """The stored delta of ``round``; None when there is none or it does not read back."""
        if round < 0:
            return None
        try:
            doc = read_document(self.path(round).read_bytes())
            meta = doc.metadata
            shapes = {e.name[len(_RESIDUAL):]: e.shape for e in doc.entries if e.name.startswith(_RESIDUAL)}
            values = type(doc)(metadata=meta, data=doc.data,
                               entries=tuple(e for e in doc.entries if not e.name.startswith(_RESIDUAL)))
            fail = failer(None)
            quantised = wire_q8.unpack(values, shapes, fail)
            residual = {e.name[len(_RESIDUAL):]: np.array(doc.array(e)) for e in doc.entries
                        if e.name.startswith(_RESIDUAL)}
            return Delta(base_sha256=meta["base_sha256"], model_sha256=meta["model_sha256"],
                         quantised=quantised, residual=residual)
        except (OSError, KeyError, WireError):
            return None

    def _save(self, round: int, delta: Delta) -> None:
        tensors = dict(wire_q8.pack(delta.quantised))
        tensors.update({_RESIDUAL + k: np.asarray(v, np.float32) for k, v in delta.residual.items()})
        data = write_document(tensors, {"base_sha256": delta.base_sha256, "model_sha256": delta.model_sha256,
                                        "round": str(round)})
        path = self.path(round)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        write_bytes(path, data, mode=0o600)
