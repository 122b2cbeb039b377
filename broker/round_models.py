"""Where each round's global model comes from, and how a crash at any instant gives the same one.

Round 1 trains from the model given to the coordinator, or else one built from the federation's
configuration and seed (:meth:`RoundModels.first`). Each later round trains from the aggregate of
the round before it (:meth:`RoundModels.after`): the accepted deltas, taken from the spool in
acceptance order (:mod:`.round_deltas`), aggregated by the configured method, applied in float32
and checked (:func:`.spool.next_model`: a refused aggregate keeps the previous model, and the
round log says why), then given the form the sites download (:mod:`.downlink`).

Each model is saved before anything announces it, and a round's ``round_aggregated`` line is
written after its model. So after a crash, a model on disk whose line is in the log is the one
that was (perhaps) announced, and is taken again as it is, the same bytes; a model without its
line is made again, and the line written then. The ``done`` hook hears ``SaveModel`` and
``LogRound`` as they complete (the crash tests stop there).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from fednca.keys import Registry

from .config import FederationConfig
from .downlink import Downlink
from .global_model import GlobalModel, float32
from .round_deltas import RoundDeltas
from .round_state import RoundState
from .roundlog import LogRecord, RoundAggregatedRecord
from .store import RoundStore

FIRST_ROUND = 1
# (closed round, model=, registry=, cfg=) -> (next model, None) or (previous model, why it is kept)
Aggregate = Callable[..., tuple[dict[str, np.ndarray], "str | None"]]


class RoundModels:
    """The models of one federation's rounds; ``log`` appends a record to the round log durably
    and publishes it; ``done`` hears each step completed; ``clock`` gives seconds since the epoch."""

    def __init__(
        self, *, config: FederationConfig, store: RoundStore, deltas: RoundDeltas, downlink: Downlink,
        clock: Callable[[], float], log: Callable[[LogRecord], None], done: Callable[[str], None],
    ) -> None:  # fmt: skip
        self._cfg = config
        self._store = store
        self._deltas = deltas
        self._downlink = downlink
        self._clock = clock
        self._log = log
        self._done = done

    def first(self, initial: Mapping[str, np.ndarray] | None) -> GlobalModel:
        """Round 1's model: the one saved before a crash (perhaps announced), else ``initial``, else
        one built from the configuration, saved before it is returned."""
        if FIRST_ROUND in self._store.model_rounds():
            return GlobalModel.of(self._store.load_model(FIRST_ROUND))
        model = dict(initial) if initial is not None else self._build()
        self._store.save_model(FIRST_ROUND, float32(model))
        self._done("SaveModel")
        return GlobalModel.of(model)

    def after(self, state: RoundState, *, model: GlobalModel, registry: Registry, logged: bool,
              aggregate: Aggregate | None = None) -> GlobalModel:
        """The model that follows the closed round ``state`` (trained from ``model``), saved and
        logged; ``logged`` whether the round log already holds its ``round_aggregated`` line.
        ``aggregate`` replaces the spool's (secure aggregation decodes a masked sum instead)."""
        nxt, started = state.round + 1, time.perf_counter()
        if nxt in self._store.model_rounds() and logged:
            tensors = self._store.load_model(nxt)  # done before a crash: the same bytes again
            size = self._store.model_path(nxt).stat().st_size
        else:
            tensors, kept = (aggregate or self._deltas.next_model)(state, model=model, registry=registry,
                                                                    cfg=self._cfg.aggregation)
            tensors = self._downlink.define(round=nxt, previous=model, candidate=tensors)
            size = len(self._store.save_model(nxt, tensors, metadata={"round": str(nxt)}))
            self._done("SaveModel")
        self._deltas.remove_spool()
        new = GlobalModel.of(tensors)
        if not logged:
            assert state.close_reason is not None  # a closed state has one
            self._log(RoundAggregatedRecord(
                round=state.round, at=self._clock(), reason=state.close_reason,
                sites=tuple(a.site for a in state.accepted), samples=sum(a.samples for a in state.accepted),
                method=self._cfg.aggregation.method, clip_norm=self._cfg.aggregation.clip_norm,
                model_sha256=new.sha256, model_bytes=size, seconds=round(time.perf_counter() - started, 3),
                model_kept=(kept or "the aggregate left the model unchanged") if new.sha256 == model.sha256 else None,
                metrics_mean=self._deltas.mean_metrics(state),
            ))  # fmt: skip
            self._done("LogRound")
        self._deltas.clear_metrics()
        return new

    def _build(self) -> dict[str, np.ndarray]:
        from fednca.model import build, tensors  # torch: only for a federation that starts from scratch

        return {name: t.numpy() for name, t in tensors(build(self._cfg.model, seed=self._cfg.seed)).items()}
