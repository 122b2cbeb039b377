"""The coordinator service: the I/O shell around the round policy, the wire codec and the store.

One :class:`Coordinator` runs one federation. The rules are in :mod:`.rounds` (pure), the message
format in :mod:`fednca.wire`, the files in :mod:`.store`; this class only turns messages and clock
readings into events and performs the actions the policy returns, in order. It wires the rooms
that do the work: :mod:`.intake` (a batch of messages from the inbox, each charged to its site's
budget and opened once on the verification threads), :mod:`.commit` (the order in which a batch
reaches disk and broker: payloads, one log append, acks), :mod:`.round_deltas` (the verified
deltas and metrics the open round keeps), :mod:`.round_models` (each round's model, aggregated at
the close), :mod:`.recovery` (the round-log lines a crash kept out), :mod:`.publisher`
(announcements, receipts, events) and :mod:`.telemetry` (the sites' last status).

An update becomes ``UpdateVerified`` or ``UpdateRejected`` with the codec's reason code; the policy
judges the batch's results one after another in arrival order, so receipts, acknowledgements and
the round log come out as with one thread. A message beyond its site's budget (:mod:`.admission`)
is acknowledged and counted, and nothing else is done; the verdict lines a peer can repeat at
will pass through :mod:`.line_limit`. A message that cannot be attributed to a site is logged on
``events`` and acknowledged. Nothing a peer sends raises out of :meth:`Coordinator.step`. After
``max_rounds`` the final model is announced as round ``max_rounds + 1`` with its deadline at the
moment the federation finished, and ``federation_finished`` is published.

The clock is injected (seconds since the epoch); nothing here sleeps. Use one thread for
``start``, ``step``, ``run_until`` and ``set_registry``; ``stop`` may be called from any thread
or a signal handler. If ``step`` raises (a full disk, a broken store), discard the object and
build a new one on the same store, as after a crash.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from fednca.errors import ConfigError
from fednca.keys import CoordinatorKeys, Registry, key_id
from fednca.rounds_vocab import RoundStatus
from fednca.topics import Topics, TopicError
from fednca.transport.base import Client, Message, SubscribeRefused
from fednca.wire_secagg import UNMASK_ANSWER, kind_of

from . import async_rounds as rounds  # the policy of either mode (rounds.md)
from .commit import GroupCommit
from .config import FederationConfig
from .errors import CoordinatorError
from .line_limit import LineKey, LineLimiter
from .global_model import GlobalModel
from .downlink import Downlink
from .publisher import NO_UPDATE_ID, Publisher
from .recovery import RoundLogIndex
from .round_events import (
    Ack, Action, Announce, CloseRound, Event, LogEvent, OpenRound, SendReceipt, SiteEnrolled, SiteRevoked, Tick,
    UpdateVerified,
)
from .intake import STORE_THREADS, Intake, take_batch
from .round_deltas import RoundDeltas
from .round_models import FIRST_ROUND, RoundModels
from .round_state import RoundState
from .secure_rounds import ROUND_KEY_BOOK, SecureRounds
from .verifier import VERIFY_THREADS, Opened, Verifier
from .workers import RecordError, VerifiedRecord, verified_filter
from .roundlog import (
    CoordinatorResumedRecord, FederationFinishedRecord, LogRecord, MessageDroppedRecord, RoundAggregatedRecord,
    SiteThrottledRecord, UpdateRejectedRecord,
)
from .store import RoundStore
from .telemetry import STATUS_MAX_BYTES, SiteStatus, StatusCache

__all__ = ["Coordinator", "CoordinatorError", "NO_UPDATE_ID", "SiteStatus", "STATUS_MAX_BYTES", "STORE_THREADS"]

log = logging.getLogger("fednca.coordinator")

Hook = Callable[[str], None]
Finish = Callable[[], None]  # the rest of one message's handling, run in arrival order


class Coordinator:
    """The coordinator of one federation.

    ``config`` the federation's settings; ``store`` its round store; ``keys`` the coordinator's
    keys; ``registry`` the enrolled sites; ``client`` a transport client (not necessarily
    connected: ``start`` connects it); ``clock`` returns seconds since the epoch;
    ``initial_model`` the weights of round 1 when the store holds none (default: built from
    ``config.model`` and ``config.seed``); ``after_action`` is called with each performed
    action's name (crash tests); ``batch`` the most messages judged before one state save;
    ``verify_threads`` the threads that open updates. With ``worker_key`` (:mod:`.workers`) the
    updates come from worker processes as verified records signed with that key, on
    ``verified/+``, their payloads already stored: this coordinator is then the aggregator.
    ``take_updates`` (default: without ``worker_key``) has it open the sites' updates itself as
    well: ``run`` without workers takes the records of the worker sessions it retires so.
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
        verify_threads: int = VERIFY_THREADS,
        worker_key: bytes | None = None,
        take_updates: bool | None = None,
    ) -> None:
        if store.federation != config.name:
            raise ConfigError("federation", f"the store is for {store.federation!r}, the configuration for {config.name!r}")
        if batch < 1:
            raise ConfigError("batch", f"must be at least 1, got {batch!r}")
        self._cfg = config
        self._takes_updates = worker_key is None if take_updates is None else take_updates
        self._takes_records = False  # subscribed to the workers' records
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
        self._publisher = Publisher(client=client, topics=self._topics, federation=config.name,
                                    signing_key=keys.signing, train=config.train, model=config.model,
                                    clock=clock, update_dtype=config.update_dtype,
                                    model_topic=config.model_delta != "off",
                                    max_staleness=config.rounds.max_staleness if config.rounds.mode == "async"
                                    else None)  # fmt: skip
        self._downlink = Downlink(store=store, encoding=config.model_delta)  # the model as sites receive it
        self._commit = GroupCommit(store=store, perform=self._perform_deferred, event=self._publisher.event,
                                   done=self._done, kept=self._keep_delta,
                                   stored_elsewhere=not self._takes_updates)  # fmt: skip
        self._worker_key = worker_key
        self._records = verified_filter(config.name).removesuffix("+")  # the workers' topics begin so
        self._verifier = Verifier(threads=verify_threads)
        self._deltas = RoundDeltas(store=store, verifier=self._verifier, box_keys=[keys.box])
        self._models = RoundModels(config=config, store=store, deltas=self._deltas, downlink=self._downlink,
                                   clock=clock, log=lambda record: self._emit(record, durable=True),
                                   done=self._done)  # fmt: skip
        self._secure = (SecureRounds(config=config.secure_aggregation, federation=config.name, store=store, keys=keys,
                                     book_path=store.folder / ROUND_KEY_BOOK, client=client, clock=clock,
                                     max_rounds=config.max_rounds, done=self._done)
                        if config.secure_aggregation.enabled else None)  # masked updates, unmasked after the close
        self._prefetched: list[Finish] = []  # the next batch, taken while the last one was stored
        self._statuses = StatusCache(clock=clock)
        self._intake: Intake | None = None  # sized from the model on the first message
        self._lines = LineLimiter()
        self._state: RoundState | None = None
        self._model = GlobalModel.empty()
        self._logged = RoundLogIndex()  # what the round log held at a restart
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
        return dict(self._model.tensors)

    @property
    def model_sha256(self) -> str:
        return self._model.sha256

    @property
    def takes_records(self) -> bool:
        """Whether the broker let this coordinator subscribe to its workers' records."""
        return self._takes_records

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def statuses(self) -> dict[str, SiteStatus]:
        return self._statuses.snapshot()

    # -- running ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, subscribe, then resume from the store or open round 1, and announce."""
        if self._started:
            raise CoordinatorError("the coordinator has already started")
        self._started = True
        self._client.connect(self._connect_timeout)  # False: it keeps trying; subscriptions follow
        if self._takes_updates:
            self._client.subscribe(self._topics.all_updates, 1)
        if self._worker_key is not None:
            try:
                self._client.subscribe(verified_filter(self._cfg.name), 1)
                self._takes_records = True
            except SubscribeRefused:
                if not self._takes_updates:
                    raise
                log.warning("the broker refuses %s to this account (run broker-config): records of retired "
                            "workers cannot be taken", verified_filter(self._cfg.name))
        self._client.subscribe(self._topics.all_status, 1)
        recovery = self._store.recover()
        for path in recovery.removed:
            log.info("removed %s, left by an interrupted write", path)
        state = recovery.state
        if state is None:
            self._open_first()
        else:
            self._state = state
            self._model = GlobalModel.of(self._store.load_model(state.round), expect=state.model_sha256)
            records = self._store.read_log()
            self._logged = RoundLogIndex(records)
            self._deltas.resume(records, state.round)
            self._emit(CoordinatorResumedRecord(round=state.round, at=self._clock(), status=state.status,
                                                accepted=len(state.accepted), uncounted=len(recovery.orphans)))
            for record in self._logged.missing(state):  # lines a crash kept out of the log
                self._emit(record, durable=True)
            if state.status == RoundStatus.CLOSED:
                self._finish_round(state)
            else:
                self._announce(state.round, state.deadline, state.quorum)
        if not self._finished:
            self._sync_enrolment()
        if state is not None and state.status == RoundStatus.OPEN and not self._takes_updates:
            self._judge_unrecorded(state.round, recovery.orphans)

    def step(self, timeout: float = 0.0) -> int:
        """Handle the messages waiting (waiting up to ``timeout`` s for the first), then let time
        run; return how many messages were handled."""
        if not self._started:
            raise CoordinatorError("call start() first")
        finishes, self._prefetched = self._prefetched or self._take_batch(timeout), []
        handled = 0
        for finish in finishes:
            if self._finished:
                break  # left unacknowledged, as if never received: the broker keeps them
            finish()
            handled += 1
        if len(finishes) >= self._batch and not self._finished:
            # A full batch: more are likely waiting. Start opening them now, on the verification
            # threads, while this batch's payloads are being fsynced; they are judged next step.
            self._prefetched = self._take_batch(0.0)
        for record in self._lines.due(self._clock()):
            self._commit.add(LogEvent(record), None)
        self._commit.flush()
        self._deltas.forget_pending()
        if not self._finished:
            self._apply(Tick(), None)
            self._commit.flush()
            if self._secure is not None and self.state.status == RoundStatus.CLOSED and self._secure.tick(self._registry):
                self._finish_round(self.state)  # the unmasking decided
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

    def close(self) -> None:
        """Stop the verification threads (the coordinator is not used after this)."""
        self._verifier.close()

    def wait_published(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the broker has taken every message published so far (call
        before disconnecting: a QoS 1 message still in the client's memory dies with it)."""
        return self._publisher.wait_published(timeout)

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

    def _apply(self, event: Event, message: Message | None) -> list[Action]:
        assert self._state is not None
        self._state, actions = rounds.handle(self._state, event, self._clock())
        self._perform(actions, message)
        return actions

    def _perform(self, actions: list[Action], message: Message | None) -> None:
        """Hand the actions of one event to the batch; a closed round is aggregated at once, after
        the batch so far is durable."""
        for action in actions:
            if isinstance(action, CloseRound):
                self._commit.flush()
                self._finish_round(self.state)
                self._done("CloseRound")
            elif not self._quiet(action):
                self._commit.add(action, message)

    def _quiet(self, action: Action) -> bool:
        """Whether ``action`` is a verdict line of a kind and site already written this minute."""
        if not isinstance(action, LogEvent) or not isinstance(action.record, UpdateRejectedRecord):
            return False
        r = action.record
        return not self._lines.offer(LineKey(r.kind, r.site, r.reason.value), r.at)

    def _perform_deferred(self, action: Action, message: Message | None) -> None:
        """An action the group commit performs once the batch's state is saved."""
        if isinstance(action, Ack):
            assert message is not None
            self._client.ack(message)
        elif isinstance(action, SendReceipt):
            self._publisher.receipt(action)
        elif isinstance(action, Announce):
            if action.model_sha256 != self._model.sha256:
                raise CoordinatorError(f"round {action.round} announces model {action.model_sha256[:16]}…, "
                                       f"but the model held is {self._model.sha256[:16]}…")
            self._announce(action.round, action.deadline, action.quorum)

    def _done(self, name: str) -> None:
        if self._after_action is not None:
            self._after_action(name)

    # -- messages ---------------------------------------------------------------------------------

    def _take_batch(self, timeout: float) -> list[Finish]:
        """Take up to ``batch`` waiting messages (the first waited for up to ``timeout`` s)."""
        return take_batch(self._client, batch=self._batch, timeout=timeout, take=self._take)

    def _take(self, message: Message) -> Finish:
        """Topic and admission now, in arrival order; an update goes to the verification threads.
        The returned function completes the message (judge, commit), again in arrival order."""
        if self._worker_key is not None and message.topic.startswith(self._records):
            return self._take_record(message)
        try:
            parsed = self._topics.parse(message.topic)
        except TopicError as e:
            why = str(e)
            return lambda: self._drop(message, why)
        if parsed.kind in ("status", "updates"):
            refused = self._admission_refused(parsed.kind, parsed.site, message)
            if refused is not None:
                return refused
        site = parsed.site
        if parsed.kind == "status":
            return lambda: self._take_status(site, message)  # type: ignore[arg-type]
        if parsed.kind != "updates":
            return lambda: self._drop(message, f"the coordinator does not take messages on {parsed.kind!r}")
        registry = self._registry
        if self._secure is not None and kind_of(message.payload) == UNMASK_ANSWER:
            return lambda: self._take_answer(site, message)  # type: ignore[arg-type]
        future = self._intake_of().submit(site, message.payload, registry)  # type: ignore[arg-type]
        return lambda: self._judge(future, message, registry, site)  # type: ignore[arg-type]

    def _intake_of(self) -> Intake:
        if self._intake is None:
            self._intake = Intake(federation=self._cfg.name, box_keys=[self._keys.box], shapes=self._model.shapes,
                                  max_update_bytes=self._model.max_update_bytes, verifier=self._verifier,
                                  opener=None if self._secure is None else self._secure.opener(self._model.shapes))
        return self._intake

    def _take_answer(self, site: str, message: Message) -> None:
        """An unmask answer: stored by the unmasking phase, then acknowledged."""
        assert self._secure is not None
        self._secure.answer(site, message.payload, self._registry)
        self._commit.add(Ack(site, None), message)

    def _take_record(self, message: Message) -> Finish:
        """A worker's verified record (:mod:`.workers`): judged as the update it tells of."""
        try:
            record = VerifiedRecord.decode(message.payload, self._worker_key,  # type: ignore[arg-type]
                                           size=sum(math.prod(s) for s in self._model.shapes.values()))
        except RecordError as e:
            why = f"not a record of this coordinator's workers: {e}"
            return lambda: self._drop(message, why)

        def finish() -> None:
            opened, e = record.opened, record.opened.event
            if isinstance(e, UpdateVerified):
                path = self._store.update_path(e.round, e.site, e.update_id)
                if not path.is_file():
                    self._drop(message, f"update {e.update_id} of site {e.site!r}: its payload is not stored")
                    return
                key = self._registry.verify_key(e.site)
                if key is None or key_id(key) != record.key_id:  # enrolment changed: open the payload again
                    opened = self._intake_of().open(e.site, path.read_bytes(), self._registry)
            judged = message
            if isinstance(e, UpdateVerified) and self._takes_updates:  # the commit writes what it stores
                judged = dataclasses.replace(message, payload=path.read_bytes())
            self._judge_stored(opened, judged, (e.round, e.update_id, path) if isinstance(e, UpdateVerified) else None)

        return finish

    def _judge_stored(self, opened: Opened, message: Message, stored: tuple[int, str, Path] | None) -> None:
        """Judge an update whose payload a worker stored (``stored``: the round and update id it
        names, and the file); delete the payload unless the policy counts it (a payload of an
        earlier round is left alone: it may be the one that round counted)."""
        before = self.state.round
        self._deltas.verified(opened)
        actions = self._apply(opened.event, message)
        if stored is not None:
            round, update_id, path = stored
            if round >= before and not any(isinstance(a, SendReceipt) and a.accepted and a.update_id == update_id
                                           for a in actions):  # fmt: skip
                path.unlink(missing_ok=True)

    def _judge_unrecorded(self, round: int, paths: Sequence[Path]) -> None:
        """Judge the open round's payloads that workers stored and the round log does not count.

        A worker acknowledges a site's update once the broker has taken its record; mosquitto
        writes its queues to disk only every autosave interval, so a broker crash can lose the
        record while the payload is stored and the site's message is gone. At start the aggregator
        therefore opens each such payload itself. One whose record is still on its way is judged
        twice: the second time as a re-delivery, counted once."""
        for path in paths:
            site, _, update_id = path.stem.rpartition("-")
            if self._finished or self.state.status != RoundStatus.OPEN or self.state.round != round:
                break  # the round closed meanwhile: what is left can no longer count
            opened = self._intake_of().open(site, path.read_bytes(), self._registry)
            e = opened.event
            if isinstance(e, UpdateVerified) and (e.site, e.update_id) != (site, update_id):
                log.warning("%s: holds update %s of site %r; left alone", path, e.update_id, e.site)
                continue
            log.info("%s: stored, not counted; judged now", path.name)
            self._judge_stored(opened, Message(topic=self._topics.updates(site), payload=b""), (round, update_id, path))
        self._commit.flush()
        self._deltas.forget_pending()

    def _take_status(self, site: str, message: Message) -> None:
        enrolled = self._registry.verify_key(site) is not None
        self._statuses.take(site=site, payload=message.payload, enrolled=enrolled)
        self._commit.add(Ack(site, None), message)  # acks go out in the order messages came

    def _judge(self, future: "Future[Opened]", message: Message, registry: Registry, site: str) -> None:
        opened = future.result()
        if registry is not self._registry:  # enrolment changed since it was opened: open it again
            opened = self._intake_of().open(site, message.payload, self._registry)
        self._deltas.verified(opened)
        self._apply(opened.event, message)

    def _admission_refused(self, kind: str, site: str | None, message: Message) -> Finish | None:
        """Charge ``message`` to its site's budget now; None if admitted, else what completes a
        refused one: acknowledged, counted and logged a few times a minute per site at most."""
        assert site is not None
        now, size, intake = self._clock(), len(message.payload), self._intake_of()
        if intake.admit(site, kind, size, now, self._registry):
            return None
        line = None
        if self._lines.offer(LineKey(SiteThrottledRecord.KIND, site, ""), now):
            refused = intake.refused(site, self._registry)
            line = SiteThrottledRecord(at=now, site=site, topic=kind, bytes=size, refused=refused)

        def finish() -> None:
            if line is not None:
                self._commit.add(LogEvent(line), None)
            self._commit.add(Ack(site, None), message)

        return finish

    def _keep_delta(self, round: int, site: str, update_id: str) -> None:
        if self._secure is not None:
            return  # a masked vector is read from its stored payload at the unmasking
        self._deltas.keep(round, site, update_id, shapes=self._model.shapes)

    def _drop(self, message: Message, why: str) -> None:
        self._emit(MessageDroppedRecord(at=self._clock(), topic=message.topic[:200], bytes=len(message.payload),
                                        why=why[:200]))  # fmt: skip
        self._commit.add(Ack("", None), message)

    # -- rounds -----------------------------------------------------------------------------------

    def _open_first(self) -> None:
        self._model = self._models.first(self._initial)
        self._state, actions = rounds.open_round(
            federation=self._cfg.name, round=FIRST_ROUND, model_sha256=self._model.sha256,
            enrolled=frozenset(self._registry.sites), config=self._cfg.rounds, now=self._clock(),
        )  # fmt: skip
        self._perform(actions, None)
        self._commit.flush()

    def _finish_round(self, state: RoundState) -> None:
        """Aggregate a closed round, save and log the new model, then open the next round (or finish)."""
        if self._secure is not None and not self._secure.begin(state, self._registry):
            return  # the unmasking phase decides; step() comes back here then
        self._model = self._models.after(state, model=self._model, registry=self._registry,
                                         logged=self._logged.has(RoundAggregatedRecord.KIND, state.round),
                                         aggregate=None if self._secure is None else self._secure.aggregate)
        if self._cfg.max_rounds is not None and state.round >= self._cfg.max_rounds:
            self._finish_federation(state)
            return
        self._apply(OpenRound(state.round + 1, self._model.sha256), None)
        self._commit.flush()

    def _finish_federation(self, state: RoundState) -> None:
        now = self._clock()
        self._announce(state.round + 1, now, state.quorum)
        self._done("Announce")
        if not self._logged.has(FederationFinishedRecord.KIND, state.round):
            self._emit(FederationFinishedRecord(round=state.round, at=now, model_sha256=self._model.sha256),
                       durable=True)  # fmt: skip
            self._done("LogFinished")
        self._finished = True

    def _sync_enrolment(self) -> None:
        enrolled, wanted = self.state.enrolled, frozenset(self._registry.sites)
        for site in sorted(wanted - enrolled):
            self._apply(SiteEnrolled(site), None)
        for site in sorted(enrolled - wanted):
            self._statuses.forget(site)
            if self._intake is not None:
                self._intake.admission.forget(site)
            self._apply(SiteRevoked(site), None)
        self._commit.flush()

    # -- publishing -------------------------------------------------------------------------------

    def _announce(self, round: int, deadline: float, quorum: int) -> None:
        secagg = None if self._secure is None else self._secure.announced(round, self.state.enrolled, self._registry)
        self._publisher.announce(round=round, deadline=deadline, quorum=quorum, tensors=self._model.tensors,
                                 delta=self._downlink.announced(round, self._model), secagg=secagg)

    def _emit(self, record: LogRecord, *, durable: bool = False) -> None:
        """One event on the ``events`` topic and in the log; ``durable`` also appends it to the
        round log now (the lines that are not part of a batch)."""
        if durable:
            self._store.append_log(record)
        self._publisher.event(record)
