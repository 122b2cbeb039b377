"""The global model the coordinator holds.

:class:`GlobalModel` is the current round's weights as read-only float32 arrays with what the
coordinator derives from them once: the sha256 that announcements and updates name, the tensor
shapes an update must have, and the largest update payload those shapes allow (the size limit
checked before anything else of a message is read).

The next model is aggregated from the round's spooled deltas (:mod:`.spool`, :mod:`.round_models`),
so no update is opened twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from fednca.wire import max_update_bytes, model_sha256

from .errors import StoreError


def float32(model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in model.items()}


@dataclass(frozen=True)
class GlobalModel:
    tensors: Mapping[str, np.ndarray]  # read-only float32 arrays
    sha256: str
    shapes: Mapping[str, tuple[int, ...]]
    max_update_bytes: int

    @classmethod
    def of(cls, model: Mapping[str, np.ndarray], *, expect: str | None = None) -> "GlobalModel":
        """``model`` as float32, frozen; with ``expect``, its sha256 must be that (a model read
        back from the store must be the one the saved round state trains from)."""
        arrays = float32(model)
        for array in arrays.values():
            array.flags.writeable = False
        sha = model_sha256(arrays)
        if expect is not None and sha != expect:
            raise StoreError(f"the stored global model has sha256 {sha[:16]}…, the round state expects {expect[:16]}…")
        shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        return cls(tensors=arrays, sha256=sha, shapes=shapes, max_update_bytes=max_update_bytes(shapes))

    @classmethod
    def empty(cls) -> "GlobalModel":
        """Held before ``start``: no tensors, no hash."""
        return cls(tensors={}, sha256="", shapes={}, max_update_bytes=0)
