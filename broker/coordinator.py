"""The coordinator service: the I/O shell around the round policy, the wire codec and the store.

One :class:`Coordinator` runs one federation. The rules are in :mod:`.rounds` (pure), the message
format in :mod:`fednca.wire`, the arithmetic in :mod:`fednca.aggregate`, the files in
:mod:`.store`; this class only turns messages and clock readings into events and performs the
actions the policy returns, in order.

A message on ``updates/<site>`` is opened by the codec (size limit first, then seal, signature,
fields, tensors) and becomes ``UpdateVerified`` or ``UpdateRejected`` with the codec's reason
code. Its actions are performed in the order the policy gives: the payload is written durably
(``StoreUpdate``), the state that counts it is saved (``SaveState``), then the message is
acknowledged to the broker, a signed receipt goes to ``receipts/<site>`` and the verdict to the
round log, the ``events`` topic and the ``logging`` module.

Group commit: the messages waiting in the inbox (at most ``batch``) are judged one after another;
then their accepted payloads are written durably (several at once), the state that counts them is
saved once, and only then is the first of them acknowledged; their round-log lines are appended
with one fsync. Every acknowledgement still follows the durable state that counts its update; a
crash before that save leaves the messages unacknowledged, and the broker delivers them again.

When the policy closes a round, the accepted updates are read back from the store one at a time,
opened again, aggregated (streaming FedAvg, or the configured method, after clipping), applied to
the global model in float32, the new model is saved, the round is logged and the next round is
announced. After ``max_rounds`` the final model is announced as round ``max_rounds + 1`` with its
deadline at the moment the federation finished, and ``federation_finished`` is published.

Messages that cannot be attributed to a site (a topic outside the federation's) are logged on
``events`` and acknowledged; status telemetry of enrolled sites is kept in memory, the last
message per site. Nothing a peer sends raises out of :meth:`Coordinator.step`.

The clock is injected (seconds since the epoch); nothing here sleeps. Use one thread for
``start``, ``step``, ``run_until`` and ``set_registry``; ``stop`` may be called from any thread
or a signal handler. If ``step`` raises (a full disk, a broken store), discard the object and
build a new one on the same store, as after a crash.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fednca import aggregate
from fednca.errors import ConfigError, FedNCAError
from fednca.keys import CoordinatorKeys, Registry
from fednca.tensorcodec import loads_strict
from fednca.topics import Topics, TopicError
from fednca.transport.base import Client, Message, PayloadTooLarge, PublishHandle
from fednca.wire import (
    UpdateHeader, WireError, check_update, make_announcement, make_receipt, max_update_bytes, model_sha256,
    open_update, verify_update,
)

from . import rounds
from .config import FederationConfig
from .rounds import (
    Ack, Action, Announce, CloseRound, Event, LogEvent, OpenRound, RoundState, SaveState, SendReceipt,
    SiteEnrolled, SiteRevoked, StoreUpdate, Tick, UpdateRejected, UpdateVerified,
)
from .store import RoundStore, StoreError

log = logging.getLogger("fednca.coordinator")

FIRST_ROUND = 1
STATUS_MAX_BYTES = 4096
STORE_THREADS = 8  # payloads of one batch written at once
NO_UPDATE_ID = "0" * 32  # a receipt's update id when the update's own could not be read
_WARNING_KINDS = frozenset({"update_rejected", "update_dropped", "message_dropped", "deadline_extended"})

Hook = Callable[[str], None]


class CoordinatorError(FedNCAError):
    """The coordinator was used out of order (stepped before start, started twice)."""


@dataclass(frozen=True)
class SiteStatus:
    received_at: float  # clock reading when it arrived
    telemetry: Mapping[str, Any]  # the site's JSON object as sent


class Coordinator:
    """The coordinator of one federation.

    ``config`` the federation's settings; ``store`` its round store; ``keys`` the coordinator's
    keys; ``registry`` the enrolled sites; ``client`` a transport client (not necessarily
    connected: ``start`` connects it); ``clock`` returns seconds since the epoch;
    ``initial_model`` the weights of round 1 when the store holds none (default: built from
    ``config.model`` and ``config.seed``); ``after_action`` is called with each performed
    action's name (crash tests); ``batch`` the most messages judged before one state save.
    """

    def __init__(
        self,
        *,
        config: FederationConfig,
        store: RoundStore,
        keys: CoordinatorKeys,
        registry: Registry,
        client: Client,
        clock: Callable[[], float],
        initial_model: Mapping[str, np.ndarray] | None = None,
        after_action: Hook | None = None,
        batch: int = 64,
        connect_timeout: float = 10.0,
    ) -> None:
        if store.federation != config.name:
            raise ConfigError("federation", f"the store is for {store.federation!r}, the configuration for {config.name!r}")
        if batch < 1:
            raise ConfigError("batch", f"must be at least 1, got {batch!r}")
        self._cfg = config
        self._store = store
        self._keys = keys
        self._registry = registry
        self._client = client
        self._clock = clock
        self._initial = initial_model
        self._after_action = after_action
        self._batch = batch
        self._connect_timeout = connect_timeout
        self._topics = Topics(config.name)
        self._state: RoundState | None = None
        self._model: dict[str, np.ndarray] = {}
        self._model_sha = ""
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._max_update = 0
        self._to_store: list[tuple[StoreUpdate, bytes]] = []
        self._unsaved: RoundState | None = None
        self._deferred: list[tuple[Action, Message | None]] = []
        self._statuses: dict[str, SiteStatus] = {}
        self._published: list[PublishHandle] = []  # not yet answered by the broker
        self._logged: set[tuple[str, int]] = set()  # (kind, round) already in the log, after a restart
        self._finished = False
        self._started = False
        self._stop = threading.Event()

    # -- what callers read ------------------------------------------------------------------------

    @property
    def state(self) -> RoundState:
        if self._state is None:
            raise CoordinatorError("the coordinator has not started")
        return self._state

    @property
    def round(self) -> int:
        return self.state.round

    @property
    def model(self) -> Mapping[str, np.ndarray]:
        """The global model of the current round (read-only float32 arrays)."""
        return dict(self._model)

    @property
    def model_sha256(self) -> str:
        return self._model_sha

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def statuses(self) -> dict[str, SiteStatus]:
        return dict(self._statuses)

    # -- running ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, subscribe, then resume from the store or open round 1, and announce."""
        if self._started:
            raise CoordinatorError("the coordinator has already started")
        self._started = True
        self._client.connect(self._connect_timeout)  # False: it keeps trying; subscriptions follow
        self._client.subscribe(self._topics.all_updates, 1)
        self._client.subscribe(self._topics.all_status, 1)
        recovery = self._store.recover()
        for path in recovery.removed:
            log.info("removed %s, left by an interrupted write", path)
        state = recovery.state
        if state is None:
            self._open_first()
        else:
            self._state = state
            self._use_model(self._store.load_model(state.round), expect=state.model_sha256)
            records = self._store.read_log()
            self._logged = {(r.get("kind"), r.get("round")) for r in records}  # type: ignore[misc]
            self._emit("coordinator_resumed", {"round": state.round, "status": state.status,
                                               "accepted": len(state.accepted), "uncounted": len(recovery.orphans)})
            self._log_unlogged(state, records)
            if state.status == rounds.CLOSED:
                self._finish_round(state)
            else:
                self._announce(state.round, state.deadline, state.quorum)
        if not self._finished:
            self._sync_enrolment()

    def _log_unlogged(self, state: RoundState, records: list[dict[str, Any]]) -> None:
        """Write the round-log lines a crash kept out: a batch's lines are appended after its acks,
        so the state can count (and the broker have forgotten) an update the log does not name yet."""
        logged = {(r.get("site"), r.get("update_id")) for r in records
                  if r.get("kind") == "update_accepted" and r.get("round") == state.round}
        for a in state.accepted:
            if (a.site, a.update_id) not in logged:
                self._emit("update_accepted", {
                    "round": state.round, "at": a.accepted_at, "site": a.site, "update_id": a.update_id,
                    "samples": a.samples, "steps": a.steps, "partial": a.partial, "recovered": True,
                }, durable=True)  # fmt: skip
        if state.status == rounds.CLOSED and ("round_closed", state.round) not in self._logged:
            self._emit("round_closed", {
                "round": state.round, "at": state.closed_at, "reason": state.close_reason,
                "sites": [a.site for a in state.accepted], "samples": sum(a.samples for a in state.accepted),
                "extensions": state.extensions, "recovered": True,
            }, durable=True)  # fmt: skip

    def step(self, timeout: float = 0.0) -> int:
        """Handle the messages waiting (waiting up to ``timeout`` s for the first), then let time
        run; return how many messages were handled."""
        if not self._started:
            raise CoordinatorError("call start() first")
        handled = 0
        message = self._client.receive(timeout)
        while message is not None:
            self._take(message)
            handled += 1
            if handled >= self._batch or self._finished:
                break
            message = self._client.receive(0.0)
        self._flush()
        if not self._finished:
            self._apply(Tick(), None)
            self._flush()
        return handled

    def run_until(
        self, condition: Callable[[Coordinator], bool] | None = None, *, poll: float = 1.0,
        max_steps: int | None = None,
    ) -> bool:  # fmt: skip
        """Step until ``condition(self)`` holds (default: the federation finished). False when
        stopped, finished or out of steps first."""
        done = condition or (lambda c: c.finished)
        steps = 0
        while not done(self):
            if self._finished or self._stop.is_set() or (max_steps is not None and steps >= max_steps):
                return False
            self.step(poll)
            steps += 1
        return True

    def stop(self) -> None:
        """Make ``run_until`` return after the current step (safe from a signal handler)."""
        self._stop.set()

    def wait_published(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the broker has taken every message published so far (call
        before disconnecting: a QoS 1 message still in the client's memory dies with it)."""
        deadline = time.monotonic() + timeout
        for handle in self._published:
            if not handle.wait(max(0.0, deadline - time.monotonic())):
                return False
        self._published = []
        return True

    def set_registry(self, registry: Registry) -> None:
        """The site registry changed: enrol and revoke sites in the open round to match.

        A site enrolled again with a new key (``enroll --replace``) is revoked and enrolled anew:
        what its old key signed in the open round would no longer verify when the round closes.
        """
        old, self._registry = self._registry, registry
        if self._state is not None and not self._finished:
            rekeyed = sorted(site for site in old.sites.keys() & registry.sites.keys()
                             if bytes(old.sites[site]) != bytes(registry.sites[site]))
            for site in rekeyed:
                self._apply(SiteRevoked(site), None)
            self._sync_enrolment()

    # -- events and actions -----------------------------------------------------------------------

    def _apply(self, event: Event, message: Message | None) -> None:
        assert self._state is not None
        self._state, actions = rounds.handle(self._state, event, self._clock())
        self._perform(actions, message)

    def _perform(self, actions: list[Action], message: Message | None) -> None:
        """Gather the actions of one event; ``_flush`` performs them, in order, for the batch."""
        for action in actions:
            if isinstance(action, StoreUpdate):
                assert message is not None
                self._to_store.append((action, message.payload))
            elif isinstance(action, SaveState):
                self._unsaved = action.state
            elif isinstance(action, CloseRound):
                self._flush()
                self._finish_round(self.state)
                self._done("CloseRound")
            else:
                self._deferred.append((action, message))

    def _flush(self) -> None:
        """Store the batch's updates, save the state that counts them, then ack, receipt and log."""
        to_store, self._to_store = self._to_store, []
        self._store_updates(to_store)
        if self._unsaved is not None:
            self._store.save_state(self._unsaved)
            self._unsaved = None
            self._done("SaveState")
        deferred, self._deferred = self._deferred, []
        records = []
        for action, message in deferred:
            if isinstance(action, Ack):
                assert message is not None
                self._client.ack(message)
            elif isinstance(action, SendReceipt):
                self._send_receipt(action)
            elif isinstance(action, LogEvent):
                records.append(self._emit(action.kind, action.fields))
            elif isinstance(action, Announce):
                if action.model_sha256 != self._model_sha:
                    raise CoordinatorError(f"round {action.round} announces model {action.model_sha256[:16]}…, "
                                           f"but the model held is {self._model_sha[:16]}…")
                self._announce(action.round, action.deadline, action.quorum)
            self._done(type(action).__name__)
        self._store.append_logs(records)  # the round log: one write and one fsync for the batch

    def _store_updates(self, batch: list[tuple[StoreUpdate, bytes]]) -> None:
        """Write the payloads durably. Several at once: the file system then commits their fsyncs
        together, several times faster than one after another."""
        def put(item: tuple[StoreUpdate, bytes]) -> None:
            action, payload = item
            self._store.put_update(action.round, action.site, action.update_id, payload)

        if len(batch) > 1:
            with ThreadPoolExecutor(max_workers=min(len(batch), STORE_THREADS), thread_name_prefix="store") as pool:
                list(pool.map(put, batch))  # re-raises the first failure
        elif batch:
            put(batch[0])
        for _ in batch:
            self._done("StoreUpdate")

    def _done(self, name: str) -> None:
        if self._after_action is not None:
            self._after_action(name)

    # -- messages ---------------------------------------------------------------------------------

    def _take(self, message: Message) -> None:
        try:
            parsed = self._topics.parse(message.topic)
        except TopicError as e:
            return self._drop(message, str(e))
        if parsed.kind == "status":
            return self._take_status(parsed.site, message)  # type: ignore[arg-type]
        if parsed.kind != "updates":
            return self._drop(message, f"the coordinator does not take messages on {parsed.kind!r}")
        self._apply(self._open(parsed.site, message.payload), message)  # type: ignore[arg-type]

    def _open(self, site: str, payload: bytes) -> UpdateVerified | UpdateRejected:
        try:
            verified = verify_update(payload, topic_site=site, coordinator_keys=[self._keys.box],
                                     registry=self._registry, max_bytes=self._max_update)
            header = check_update(verified, federation=self._cfg.name, round=None, base_sha256=None,
                                  shapes=self._shapes).header
        except WireError as e:
            log.debug("update on %s refused: %s", self._topics.updates(site), e)
            h = e.header if isinstance(e.header, UpdateHeader) else None
            return UpdateRejected(site, h.update_id if h else None, e.reason.value, h.round if h else None)
        return UpdateVerified(site, header.update_id, header.round, header.base_sha256, header.samples,
                              header.steps, header.partial)

    def _take_status(self, site: str, message: Message) -> None:
        telemetry = None
        if self._registry.verify_key(site) is not None and len(message.payload) <= STATUS_MAX_BYTES:
            try:
                telemetry = loads_strict(message.payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                telemetry = None
        if isinstance(telemetry, dict):
            self._statuses[site] = SiteStatus(self._clock(), telemetry)
        else:
            log.debug("status of %r ignored: not a JSON object of at most %d bytes from an enrolled site",
                      site, STATUS_MAX_BYTES)
        self._deferred.append((Ack(site, None), message))  # acks go out in the order messages came

    def _drop(self, message: Message, why: str) -> None:
        self._emit("message_dropped", {"topic": message.topic[:200], "bytes": len(message.payload), "why": why[:200]})
        self._deferred.append((Ack("", None), message))

    # -- rounds -----------------------------------------------------------------------------------

    def _open_first(self) -> None:
        if FIRST_ROUND in self._store.model_rounds():
            model = self._store.load_model(FIRST_ROUND)  # saved before a crash, perhaps announced
        else:
            model = dict(self._initial) if self._initial is not None else self._build_model()
            self._store.save_model(FIRST_ROUND, _float32(model))
            self._done("SaveModel")
        self._use_model(model)
        self._state, actions = rounds.open_round(
            federation=self._cfg.name, round=FIRST_ROUND, model_sha256=self._model_sha,
            enrolled=frozenset(self._registry.sites), config=self._cfg.rounds, now=self._clock(),
        )  # fmt: skip
        self._perform(actions, None)
        self._flush()

    def _build_model(self) -> dict[str, np.ndarray]:
        from fednca.model import build, tensors  # torch: only for a federation that starts from scratch

        return {name: t.numpy() for name, t in tensors(build(self._cfg.model, seed=self._cfg.seed)).items()}

    def _use_model(self, model: Mapping[str, np.ndarray], expect: str | None = None) -> None:
        arrays = _float32(model)
        for array in arrays.values():
            array.flags.writeable = False
        sha = model_sha256(arrays)
        if expect is not None and sha != expect:
            raise StoreError(f"the stored global model has sha256 {sha[:16]}…, the round state expects {expect[:16]}…")
        self._model, self._model_sha = arrays, sha
        self._shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        self._max_update = max_update_bytes(self._shapes)

    def _finish_round(self, state: RoundState) -> None:
        """Aggregate a closed round, save and log the new model, then open the next round (or finish)."""
        nxt, started = state.round + 1, time.perf_counter()
        if nxt in self._store.model_rounds() and ("round_aggregated", state.round) in self._logged:
            model = self._store.load_model(nxt)  # done before a crash: the same bytes again
            size = self._store.model_path(nxt).stat().st_size
        else:
            delta = aggregate.aggregate(self._read_back(state), self._cfg.aggregation)
            model = aggregate.apply(self._model, delta)
            size = len(self._store.save_model(nxt, model, metadata={"round": str(nxt)}))
            self._done("SaveModel")
        self._use_model(model)
        if ("round_aggregated", state.round) not in self._logged:
            self._emit("round_aggregated", {
                "round": state.round, "at": self._clock(), "reason": state.close_reason,
                "sites": [a.site for a in state.accepted], "samples": sum(a.samples for a in state.accepted),
                "method": self._cfg.aggregation.method, "clip_norm": self._cfg.aggregation.clip_norm,
                "model_sha256": self._model_sha, "model_bytes": size, "seconds": round(time.perf_counter() - started, 3),
            }, durable=True)  # fmt: skip
            self._done("LogRound")
        if self._cfg.max_rounds is not None and state.round >= self._cfg.max_rounds:
            self._finish_federation(state)
            return
        self._apply(OpenRound(nxt, self._model_sha), None)
        self._flush()

    def _read_back(self, state: RoundState) -> Iterator[tuple[Mapping[str, np.ndarray], float]]:
        """The round's accepted deltas, one at a time, opened again from the stored payloads."""
        for entry, payload in self._store.read_accepted(state):
            path = self._store.update_path(state.round, entry.site, entry.update_id)
            if self._registry.verify_key(entry.site) is None:
                raise StoreError(f"{path}: round {state.round} counts this update, but site {entry.site!r} is no "
                                 "longer enrolled; enrol it again with the same key to finish the round")
            try:
                update = open_update(payload, topic_site=entry.site, coordinator_keys=[self._keys.box],
                                     registry=self._registry, federation=self._cfg.name, round=state.round,
                                     base_sha256=state.model_sha256, shapes=self._shapes, max_bytes=self._max_update)
            except WireError as e:
                raise StoreError(f"{path}: the stored update no longer opens ({e})") from None
            if update.header.update_id != entry.update_id:
                raise StoreError(f"{path}: holds update {update.header.update_id}, not {entry.update_id}")
            yield update.delta, entry.samples

    def _finish_federation(self, state: RoundState) -> None:
        now = self._clock()
        self._announce(state.round + 1, now, state.quorum)
        self._done("Announce")
        if ("federation_finished", state.round) not in self._logged:
            self._emit("federation_finished", {"round": state.round, "at": now, "model_sha256": self._model_sha},
                       durable=True)
            self._done("LogFinished")
        self._finished = True

    def _sync_enrolment(self) -> None:
        enrolled, wanted = self.state.enrolled, frozenset(self._registry.sites)
        for site in sorted(wanted - enrolled):
            self._apply(SiteEnrolled(site), None)
        for site in sorted(enrolled - wanted):
            self._statuses.pop(site, None)
            self._apply(SiteRevoked(site), None)
        self._flush()

    # -- publishing -------------------------------------------------------------------------------

    def _announce(self, round: int, deadline: float, quorum: int) -> None:
        payload = make_announcement(
            federation=self._cfg.name, round=round, deadline=math.ceil(deadline), quorum=quorum,
            train=self._cfg.train, model=self._cfg.model, tensors=self._model, signing_key=self._keys.signing,
        )  # fmt: skip
        self._publish(self._topics.round, payload, retain=True)

    def _send_receipt(self, action: SendReceipt) -> None:
        payload = make_receipt(
            federation=self._cfg.name, site=action.site, round=action.round,
            update_id=action.update_id or NO_UPDATE_ID, reason=None if action.accepted else action.reason,
            signing_key=self._keys.signing,
        )  # fmt: skip
        self._publish(self._topics.receipts(action.site), payload)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if len(self._published) >= 256:
            self._published = [h for h in self._published if not h.done]
        self._published.append(self._client.publish(topic, payload, qos=1, retain=retain))

    def _emit(self, kind: str, fields: Mapping[str, Any], *, durable: bool = False) -> dict[str, Any]:
        """One event on the ``events`` topic and in the log; ``durable`` also appends it to the round
        log now. Returns the round-log record."""
        record = {"kind": kind, "at": self._clock(), **fields}
        if durable:
            self._store.append_log(record)
        message = {"federation": self._cfg.name, **record}
        try:
            self._publish(self._topics.events, _json(message))
        except PayloadTooLarge:  # a very large federation's site lists: send their lengths instead
            self._publish(self._topics.events, _json(_shortened(message, 0)))
        level = logging.WARNING if kind in _WARNING_KINDS else logging.INFO
        shown = _shortened({k: v for k, v in fields.items() if k != "at"}, 8)  # the log line has its own time
        log.log(level, "%s %s", kind, " ".join(f"{k}={v}" for k, v in shown.items()))
        return record


def _float32(model: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in model.items()}


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def _shortened(fields: Mapping[str, Any], longest: int) -> dict[str, Any]:
    """``fields`` with every list longer than ``longest`` replaced by its length."""
    return {k: len(v) if isinstance(v, list) and len(v) > longest else v for k, v in fields.items()}
