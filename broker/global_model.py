"""The global model the coordinator holds, and the stored deltas that make the next one.

:class:`GlobalModel` is the current round's weights as read-only float32 arrays with what the
coordinator derives from them once: the sha256 that announcements and updates name, the tensor
shapes an update must have, and the largest update payload those shapes allow (the size limit
checked before anything else of a message is read).

:func:`stored_deltas` reads a closed round's accepted updates back from the store one at a time
and opens them again, exactly as when they arrived, so aggregation streams over them without
holding every delta in memory, and a payload that changed on disk is an error, not a silent
contribution.

:func:`guarded_model` is the last step of a round: the aggregate, or the previous model when the
aggregate fails its checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from nacl.public import PrivateKey

from fednca import aggregate
from fednca.aggregate import AggregationConfig, AggregationError
from fednca.keys import Registry
from fednca.wire import WireError, max_update_bytes, model_sha256, open_update

from .errors import StoreError
from .round_state import RoundState
from .store import RoundStore


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


def stored_deltas(
    *, store: RoundStore, state: RoundState, model: GlobalModel, registry: Registry, box_key: PrivateKey,
) -> Iterator[tuple[Mapping[str, np.ndarray], float]]:  # fmt: skip
    """The closed round's accepted deltas with their sample counts, one at a time, in acceptance
    order, opened again from the stored payloads."""
    for entry, payload in store.read_accepted(state):
        path = store.update_path(state.round, entry.site, entry.update_id)
        if registry.verify_key(entry.site) is None:
            raise StoreError(f"{path}: round {state.round} counts this update, but site {entry.site!r} is no "
                             "longer enrolled; enrol it again with the same key to finish the round")
        try:
            update = open_update(payload, topic_site=entry.site, coordinator_keys=[box_key], registry=registry,
                                 federation=state.federation, round=state.round, base_sha256=state.model_sha256,
                                 shapes=model.shapes, max_bytes=model.max_update_bytes)  # fmt: skip
        except WireError as e:
            raise StoreError(f"{path}: the stored update no longer opens ({e})") from None
        if update.header.update_id != entry.update_id:
            raise StoreError(f"{path}: holds update {update.header.update_id}, not {entry.update_id}")
        yield update.delta, entry.samples


def guarded_model(
    previous: Mapping[str, np.ndarray], deltas: Iterable[tuple[Mapping[str, np.ndarray], float]],
    cfg: AggregationConfig,
) -> tuple[dict[str, np.ndarray], str | None]:  # fmt: skip
    """The next global model and None, or the previous model and why the aggregate was refused.

    What sites sent can make aggregation fail (values that overflow) or give a model that
    ``aggregate.check_model`` refuses; either way the round closes, the federation keeps the model
    it had, and the reason goes into the round log. Nothing a site sends stops the coordinator.
    """
    try:
        candidate = aggregate.apply(previous, aggregate.aggregate(deltas, cfg))
    except AggregationError as e:
        return dict(previous), f"aggregation failed: {e}"
    problem = aggregate.check_model(candidate, previous, cfg)
    if problem is not None:
        return dict(previous), problem
    return candidate, None
