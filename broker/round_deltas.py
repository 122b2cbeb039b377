"""What the open round keeps of each update it accepts, from its arrival to the close: the verified
delta (a row of the round's :class:`.spool.DeltaSpool`) and the metrics the site measured.

Each update is opened once, when it arrives (:mod:`.intake`). What opening it gave waits here
(:meth:`RoundDeltas.verified`) for the policy's word; its delta joins the spool only when its
payload is durable (:meth:`RoundDeltas.keep`, the group commit's hook), so the spool never holds a
delta that the store lacks, and the close aggregates the spool without opening any update again.

After a restart the spool is empty (it is not durable, on purpose: see :mod:`.spool`): the close
opens again, once, from the store, the counted updates whose rows are missing
(:meth:`RoundDeltas.next_model`), on the verification threads. A stored update that no longer
opens is a damaged store, and an error: a round must not close silently smaller. The metrics come
back from the round log's ``update_accepted`` lines (:meth:`RoundDeltas.resume`).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
from nacl.public import PrivateKey

from fednca.aggregate import AggregationConfig
from fednca.aggregate_rows import flatten, layout_of, row_norm
from fednca.keys import Registry
from fednca.wire import WireError, open_update

from .errors import CoordinatorError, StoreError
from .global_model import GlobalModel
from .round_events import UpdateVerified
from .round_state import RoundState
from .roundlog import LogRecord, UpdateAcceptedRecord
from .spool import DeltaSpool, Key, next_model
from .staleness import stale_inputs
from .store import RoundStore
from .verifier import Opened, Verifier

log = logging.getLogger("fednca.coordinator")

Shapes = Mapping[str, tuple[int, ...]]


class RoundDeltas:
    """The deltas and metrics of the open round; ``store`` the round store (payloads, spool
    folder), ``verifier`` the threads that open stored updates again, ``box_keys`` the keys
    updates are sealed to."""

    def __init__(self, *, store: RoundStore, verifier: Verifier, box_keys: Sequence[PrivateKey]) -> None:
        self._store = store
        self._verifier = verifier
        self._box_keys = list(box_keys)
        self._spool: DeltaSpool | None = None  # the verified deltas of the round they were accepted in
        self._pending: dict[Key, Opened] = {}  # verified in this batch, waiting for the policy's word
        self._metrics: dict[Key, dict[str, float]] = {}  # what each site measured

    def resume(self, records: Sequence[LogRecord], round: int) -> None:
        """Take the metrics of ``round``'s accepted updates from the round log (at a restart)."""
        self._metrics = {(r.site, r.update_id): dict(r.metrics) for r in records
                         if isinstance(r, UpdateAcceptedRecord) and r.round == round}  # fmt: skip

    def verified(self, opened: Opened) -> None:
        """An update opened: if it verified, its delta waits for the policy to accept it."""
        event = opened.event
        if isinstance(event, UpdateVerified):
            self._metrics[(event.site, event.update_id)] = dict(event.metrics)
            self._pending[(event.site, event.update_id)] = opened

    def forget_pending(self) -> None:
        """The batch is committed: the deltas still waiting were refused or re-delivered."""
        self._pending.clear()

    def keep(self, round: int, site: str, update_id: str, *, shapes: Shapes) -> None:
        """An accepted update's payload is stored: its verified delta joins the round's spool."""
        opened = self._pending.pop((site, update_id), None)
        if opened is None or opened.row is None:
            raise CoordinatorError(f"update {update_id} of site {site!r} was stored without being verified")
        self._spool_of(round, shapes).add((site, update_id), opened.row, opened.norm)

    def next_model(
        self, state: RoundState, *, model: GlobalModel, registry: Registry, cfg: AggregationConfig,
    ) -> tuple[dict[str, np.ndarray], str | None]:  # fmt: skip
        """The closed round's next model from the spool, in acceptance order, and None; or the
        previous model and why the aggregate was refused (:func:`.spool.next_model`)."""
        keys = [(a.site, a.update_id) for a in state.accepted]
        spool = self._spool_of(state.round, model.shapes)
        self._refill(state, spool, keys, model=model, registry=registry)
        rows, norms = stale_inputs(spool.rows(keys), spool.norms(keys), [a.staleness for a in state.accepted])
        new, kept = next_model(dict(model.tensors), rows, norms=norms,  # type: ignore[arg-type]
                               weights=[a.samples for a in state.accepted], layout=spool.layout,
                               cfg=cfg)  # fmt: skip
        if kept is not None:
            log.warning("round %d: the aggregate was refused, the next round keeps the previous model: %s",
                        state.round, kept)
        return new, kept

    def remove_spool(self) -> None:
        """The round is aggregated: its deltas are no longer needed."""
        if self._spool is not None:
            self._spool.remove()
            self._spool = None

    def mean_metrics(self, state: RoundState) -> dict[str, float]:
        """The mean of the metrics that the round's accepted updates reported."""
        return mean_metrics([self._metrics.get((a.site, a.update_id), {}) for a in state.accepted])

    def clear_metrics(self) -> None:
        """The round is logged: the next round's updates bring their own."""
        self._metrics.clear()

    def _spool_of(self, round: int, shapes: Shapes) -> DeltaSpool:
        if self._spool is None or self._spool.folder != self._store.spool_folder(round):
            if self._spool is not None:
                self._spool.remove()
            self._spool = DeltaSpool(folder=self._store.spool_folder(round), layout=layout_of(shapes))
        return self._spool

    def _refill(self, state: RoundState, spool: DeltaSpool, keys: list[Key], *, model: GlobalModel,
                registry: Registry) -> None:  # fmt: skip
        """Open again, from the store, the counted updates whose deltas the spool lacks (those a
        restart lost), on the verification threads."""
        missing = spool.missing(keys)
        if not missing:
            return
        log.info("round %d: opening %d stored updates again after a restart", state.round, len(missing))
        futures = [(key, self._verifier.submit(self._reopen, state, key, model, registry)) for key in missing]
        for key, future in futures:
            spool.add(key, *future.result())

    def _reopen(self, state: RoundState, key: Key, model: GlobalModel, registry: Registry) -> tuple[np.ndarray, float]:
        site, update_id = key
        path = self._store.update_path(state.round, site, update_id)
        entry = state.accepted_from(site)
        stale = entry.staleness if entry is not None else 0  # trained from an earlier model (async)
        if registry.verify_key(site) is None:
            raise StoreError(f"{path}: round {state.round} counts this update, but site {site!r} is no "
                             "longer enrolled; enrol it again with the same key to finish the round")
        try:
            update = open_update(self._store.read_update(state.round, site, update_id), topic_site=site,
                                 coordinator_keys=self._box_keys, registry=registry,
                                 federation=state.federation, round=state.round - stale,
                                 base_sha256=state.earlier[stale - 1].model_sha256 if stale else state.model_sha256,
                                 shapes=model.shapes, max_bytes=model.max_update_bytes)  # fmt: skip
        except WireError as e:
            raise StoreError(f"{path}: the stored update no longer opens ({e})") from None
        if update.header.update_id != update_id:
            raise StoreError(f"{path}: holds update {update.header.update_id}, not {update_id}")
        layout = layout_of(model.shapes)
        row = flatten(update.delta, layout)
        return row, row_norm(row, layout)


def mean_metrics(reported: list[Mapping[str, float]]) -> dict[str, float]:
    """Per metric name, the mean over the sites that reported it (rounded to 4 decimals)."""
    names = sorted({name for m in reported for name in m})
    return {name: round(float(np.mean([m[name] for m in reported if name in m])), 4) for name in names}
