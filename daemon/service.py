"""The daemon's shell: MQTT, the trainer child, files, sensors and systemd around the pure lifecycle.

Everything that happens becomes one event on one queue: a received message (a network thread
hands it over), a trainer message (a reader thread), a stop request (a signal handler or another
thread). The main loop takes events, feeds :func:`fednca_daemon.lifecycle.handle` and performs
the returned actions in order; timers (gate readings, telemetry, the watchdog, the machine's own
wake-up) are checked on every turn. Every QoS 1 message is acknowledged once it is handled.

The daemon process imports no PyTorch; training runs in a child, supervised by :mod:`.supervisor`.
The coordinator's announcements and receipts are verified by :mod:`.coordinator_inbox`; what
other threads hand over and the loop's timers are the typed items of :mod:`.shell_events`.

Faults of the device and the network never end the process (a crash loop under systemd's
``Restart=on-failure`` helps nobody): a state folder that cannot be opened or written (a full
disk, wrong permissions), a damaged file in it, a broker that refuses the site. Each is logged
once as one line saying what, where and what to do (:mod:`.trouble`), retried on a growing
back-off while the watchdog is still pinged, and what is stored is kept: a damaged file is moved
aside (``.corrupt``), a finished update is never deleted because of an error, and a receipt whose
``done.json`` cannot be written keeps its update in the outbox until it can.

Two clocks: ``wall`` is the device's wall clock (the telemetry's time, the clock offset);
``clock`` times the lifecycle (deadlines, rests, resends). By default ``clock`` is monotonic,
anchored to the wall clock at start, so a wall clock stepped while a round runs moves no
deadline; a round's deadline is the receipt time plus the announcement's ``seconds_left``.

``probe(point)`` is called at the named points where a crash matters (``chunk-started``,
``chunk-done``, ``update-stored``, ``update-published``, ``update-delivered``,
``update-republished``, ``done-saved``); the crash tests kill the process there.
"""

from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
import time
from typing import Callable

from fednca import __version__
from fednca.atomic import write_bytes
from fednca.display import Pace
from fednca.keys import CoordinatorPublicKeys, SiteKeys
from fednca.notify import Notifier
from fednca.topics import TopicError, Topics
from fednca.transport.base import Client, Message, PayloadTooLarge, TransportError
from fednca.wire import Announcement, WireError
from fednca.wire_secagg import UNMASK_REQUEST, kind_of

from . import lifecycle as lc
from .config import DaemonConfig
from .coordinator_inbox import CoordinatorInbox
from .gates import GateState, Readings, evaluate
from .inference import InferenceKeeper
from .errors import DamagedFile, StateFolderError
from .faults import BrokerLink, open_until_usable, storage_problem, why
from .outbox import Done, StateFolder, Writer
from .sensors import Sensors
from .shell_events import Inbound, Queued, StopAsked, Timer, Timers
from .held_model import load_residual, save_residual
from .secure_site import SecureAggregationRefused, SecureSite
from .submission import CheckpointMismatch, ErrorFeedback, build_update, checkpoint_damage
from .supervisor import FromTrainer, TrainerSetup, TrainerSupervisor
from .telemetry import Snapshot, status_json, status_line
from .uploads import Uploads
from .trainer_protocol import DataSpec
from .trouble import RETRY_BASE_S, Troubles

log = logging.getLogger("fednca.daemon")

CONNECT_TIMEOUT_S = 2.0  # then the client goes on trying in the background
MAX_WAIT_S = 5.0


def policy_of(cfg: DaemonConfig) -> lc.Policy:
    return lc.Policy(chunk_s=cfg.training.chunk_s, min_steps=cfg.training.min_steps,
                     deadline_margin_s=cfg.training.deadline_margin_s, duty_cycle=cfg.cpu.duty_cycle,
                     threads=cfg.cpu.threads, resend_s=cfg.outbox.resend_s, backoff_s=cfg.training.worker_backoff_s)


def _no_probe(point: str) -> None:
    return None


def anchored_clock(wall: Callable[[], float]) -> Callable[[], float]:
    """A monotonic clock that reads like ``wall`` did when it was made: steps of the wall clock
    (NTP, an operator) do not move it, and saved deadlines still mean something after a restart."""
    offset = wall() - time.monotonic()
    return lambda: time.monotonic() + offset


class Service:
    def __init__(
        self,
        *,
        config: DaemonConfig,
        client: Client,
        site_keys: SiteKeys,
        coordinator: CoordinatorPublicKeys,
        notifier: Notifier | None = None,
        sensors: Sensors | None = None,
        wall: Callable[[], float] = time.time,
        probe: Callable[[str], None] = _no_probe,
        python: str = sys.executable,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        clock: Callable[[], float] | None = None,
        writer: Writer = write_bytes,
        retry_base_s: float = RETRY_BASE_S,
    ) -> None:
        self.cfg = config
        self.client = client
        self.site_keys = site_keys
        self.coordinator = coordinator
        self.notifier = notifier or Notifier(env={})
        self.sensors = sensors or Sensors()
        self.wall = wall
        self.clock = clock or anchored_clock(wall)
        self.probe = probe
        self.python = python
        self.connect_timeout = connect_timeout
        self.topics = Topics(config.federation)
        self.folder = StateFolder(path=config.state_dir, writer=writer)
        self.inference = InferenceKeeper(state_dir=config.state_dir, python=python) if config.inference.export else None
        self.policy = policy_of(config)
        self.state = lc.State(policy=self.policy)
        self.inbox = CoordinatorInbox(federation=config.federation, site=config.site, coordinator=coordinator,
                                      folder=self.folder)
        self.secure = SecureSite(state_dir=config.state_dir, key_dir=config.keys.site, site=config.site,
                                 federation=config.federation, signing_key=site_keys.signing, coordinator=coordinator)
        self._events: queue.SimpleQueue[Queued] = queue.SimpleQueue()
        self._pending: collections.deque[lc.Event] = collections.deque()
        self.trainer = TrainerSupervisor(
            setup=TrainerSetup(state_dir=str(self.folder.path), federation=config.federation,
                               coordinator_verify_key=bytes(coordinator.verify).hex(),
                               data=DataSpec.from_config(config.data), threads=config.cpu.threads,
                               low_memory=config.training.low_memory, seed=config.seed,
                               trainer=config.training.trainer),
            deliver=self._events.put, follow=self.sensors.follow_trainer, python=python)
        self._gates = GateState()
        self._readings: Readings | None = None
        self.uploads = Uploads()  # published updates waiting for the broker's PUBACK
        self._closing = threading.Event()
        self._exited = False
        self._pace = Pace()  # the round's progress and ETA, one log line per chunk
        self._timers = Timers()
        self._troubles = Troubles(log=log, base_s=retry_base_s)
        self._deferred: list[lc.Action] = []  # actions the disk refused, performed again later
        self.link = BrokerLink(client=client, troubles=self._troubles, clock=self.clock, site=config.site,
                               timeout=connect_timeout)
        self._troubles_told = 0  # Troubles.changes when the status was last published

    # -- public -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the daemon to stop; safe from a signal handler or any thread."""
        self._events.put(StopAsked())

    @property
    def worker_pid(self) -> int | None:
        return self.trainer.pid

    @property
    def trainer_pids(self) -> list[int]:
        return self.trainer.pids

    @property
    def announcement(self) -> Announcement | None:
        """The newest verified round announcement."""
        return self.inbox.announcement

    @property
    def _message_error(self) -> str | None:
        return self.inbox.error

    def run(self) -> int:
        pump = threading.Thread(target=self._pump, name="mqtt-inbox", daemon=True)
        try:
            loaded = self._open_folder()
            if loaded is not None:
                self._start(*loaded)
                pump.start()
                self.notifier.ready(status_line(self._snapshot()))
            while not self._exited and loaded is not None:
                try:
                    self._turn()
                except OSError as e:  # the device, not a bug of ours: say so, wait, go on
                    self._troubles.report(f"os-{e.errno}", f"unexpected system error: {e}; the daemon goes on",
                                          self.clock())
        finally:
            self._closing.set()
            self.trainer.kill_if_running()
            if self.inference is not None:
                self.inference.stop()
            self.folder.close()
        self._farewell()
        return 0

    # -- start and stop -------------------------------------------------------------------------

    def _open_folder(self) -> tuple[Done, lc.RoundInfo | None, int, int | None] | None:
        """Open and lock the state folder and read what it holds, waiting (watchdog pinged) and
        trying again while it is unusable; None if a stop was asked meanwhile."""
        def attempt() -> tuple[Done, lc.RoundInfo | None, int, int | None]:
            self.folder.open()
            done = self._load_done()
            return (done, *self.inbox.resume(now=self.clock(), wall=self.wall()))

        return open_until_usable(folder=self.folder.path, attempt=attempt, release=self.folder.close,
                                 troubles=self._troubles, clock=self.clock, waiting=self.notifier.ready,
                                 pause=self._pause)

    def _load_done(self) -> Done:
        try:
            return self.folder.load_done()
        except DamagedFile as e:
            aside = self.folder.move_aside(e.path)  # type: ignore[arg-type]
            log.error("%s: moved to %s; a round already submitted may be trained and submitted again (the "
                      "coordinator counts one update per site and round)", e, aside)
            return Done()

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` before the folder is tried again, pinging the watchdog; True if a
        stop was asked meanwhile."""
        end = time.monotonic() + seconds
        while True:
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                item = self._events.get(timeout=min(left, self.notifier.watchdog_interval or MAX_WAIT_S))
            except queue.Empty:
                continue
            if isinstance(item, StopAsked):
                log.info("stopping")
                self.notifier.stopping()
                return True

    def _start(self, done: Done, round_info: lc.RoundInfo | None, steps: int, planned: int | None) -> None:
        self._read_gates()  # before anything starts: a device that boots hot starts no trainer
        self.state, actions = lc.initial(self.policy, now=self.clock(), round=round_info, done_round=done.round,
                                         outbox=self.folder.outbox.entries(), steps=steps, planned=planned,
                                         gates_open=self._gates.open, gate_reasons=self._gates.reasons)
        self.client.subscribe(self.topics.round, qos=1)
        self.client.subscribe(self.topics.receipts(self.cfg.site), qos=1)
        if not self.link.connect() and not self.link.refused:
            log.warning("broker not reachable yet; training goes on from the saved round, and the client retries")
        self.link.was_connected = self.client.connected
        log.info("started: site %s, federation %s, %s", self.cfg.site, self.cfg.federation,
                 status_line(self._snapshot()))
        self._perform_all(actions)
        self._drain()

    def _farewell(self) -> None:
        if self.client.connected:
            try:
                handle = self.client.publish(self.topics.status(self.cfg.site), status_json(self._snapshot("stopped")),
                                             qos=1, retain=True)
                handle.wait(1.0)
            except TransportError as e:
                log.warning("final status not sent: %s", e)
        self.client.disconnect()
        self.notifier.close()
        log.info("stopped")

    # -- the loop -------------------------------------------------------------------------------

    def _turn(self) -> None:
        try:
            item = self._events.get(timeout=self._timeout())
        except queue.Empty:
            item = None
        self._check_deliveries()
        while item is not None:
            self._dispatch(item)
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                item = None
        self._check_timers()
        self._feed(lc.Tick())

    def _timeout(self) -> float:
        now = time.monotonic()
        times = [t for t in (self._timers.next_at(), self.trainer.kill_at) if t is not None]
        wait = min((t - now for t in times), default=MAX_WAIT_S)
        clock = self.clock()
        wakes = [lc.next_wakeup(self.state, clock)]
        if self.link.refused or self._deferred or self.inbox.holding:  # what the loop retries itself
            wakes.append(self._troubles.next_at())
        for wake in wakes:
            if wake is not None and wake > clock:
                wait = min(wait, wake - clock)
        return min(max(wait, 0.0), MAX_WAIT_S)

    def _check_deliveries(self) -> None:
        """Note updates the broker has taken (its PUBACK); the receipt is what ends the round."""
        for handle, rnd, uid in ((u.handle, u.round, u.update_id) for u in self.uploads.answered()):
            if handle.accepted:
                log.info("round %d: update %s taken by the broker", rnd, uid[:8])
                self.probe("update-delivered")
            else:
                log.warning("round %d: the broker refused update %s (reason code %s); it stays in the outbox",
                            rnd, uid[:8], handle.reason_code)

    def _check_timers(self) -> None:
        now = time.monotonic()
        if self._timers.due(Timer.GATES, now) and self._read_gates():
            self._feed(lc.GatesChanged(self._gates.open, self._gates.reasons))
        if self._timers.due(Timer.TELEMETRY, now) or self._troubles.changes != self._troubles_told:
            self._troubles_told = self._troubles.changes  # a problem shows in the status as it appears
            self._publish_status()
        interval = self.notifier.watchdog_interval
        if interval and self._timers.due(Timer.WATCHDOG, now) and self.state.may_ping_watchdog:
            self.notifier.watchdog()
            self._timers.set(Timer.WATCHDOG, now + interval)
        self.trainer.check(now)
        if self.inference is not None:
            self.inference.poll()
        if self.link.watch():
            log.info("connected to the broker")
            self._publish_status()
        if (self._deferred or self.inbox.holding) and self._troubles.due("storage", self.clock()):
            self._retry_storage()

    # -- the state folder's troubles ------------------------------------------------------------

    def _storage_failed(self, e: OSError) -> None:
        self._troubles.report("storage", storage_problem(self.folder.path, e), self.clock())

    def _stored(self) -> None:
        self._troubles.clear("storage", f"state folder {self.folder.path} writable again")

    def _retry_storage(self) -> None:
        """Store what the disk refused before: a held announcement, then deferred actions in order."""
        try:
            event = self.inbox.store_held()
        except OSError as e:
            self._storage_failed(e)
            return
        if event is not None:
            self._announced(event)
        deferred, self._deferred = self._deferred, []
        self._perform_all(deferred)
        if not self._deferred and not self.inbox.holding:
            self._stored()

    def _dispatch(self, item: Queued) -> None:
        if isinstance(item, StopAsked):
            if not self.state.stopping:
                log.info("stopping")
                self.notifier.stopping()
            self._feed(lc.StopRequested())
        elif isinstance(item, Inbound):
            self._on_message(item.message)
        elif isinstance(item, FromTrainer):
            event = self.trainer.on_event(item)
            if event is not None:
                self._feed(event)
                if isinstance(event, lc.ChunkDone):
                    log.info("%s", self._pace.line(round=event.round, steps=event.steps, planned=event.planned,
                                                   now=self.clock()))
                    self.probe("chunk-done")

    def _feed(self, event: lc.Event) -> None:
        self._pending.append(event)
        self._drain()

    def _drain(self) -> None:
        """Handle queued events, including those that performing an action produced."""
        while self._pending:
            self.state, actions = lc.handle(self.state, self._pending.popleft(), self.clock())
            self._perform_all(actions)

    def _perform_all(self, actions: list[lc.Action]) -> None:
        for action in actions:
            if isinstance(action, lc.DropUpdate) and any(
                    isinstance(d, lc.SaveDone) and d.round >= action.round for d in self._deferred):
                self._deferred.append(action)  # an update leaves the outbox only once its receipt is saved
                continue
            self._perform(action)

    def _pump(self) -> None:
        while not self._closing.is_set():
            message = self.client.receive(timeout=0.5)
            if message is not None:
                self._events.put(Inbound(message))

    # -- actions --------------------------------------------------------------------------------

    def _perform(self, a: lc.Action) -> None:
        if isinstance(a, lc.StartWorker):
            try:
                self.trainer.start(a.round)
            except OSError as e:  # no memory or processes left: back off like a failed trainer
                self._troubles.report("trainer-start", f"cannot start the trainer ({why(e)}); the daemon "
                                      f"tries again later", self.clock())
                self._pending.append(lc.WorkerExited(f"cannot start the trainer: {e.strerror or e}"))
            else:
                self._troubles.clear("trainer-start")
        elif isinstance(a, lc.RunChunk):
            self.trainer.run_chunk(a.seconds)
            self.probe("chunk-started")
        elif isinstance(a, lc.StopWorker):
            self.trainer.stop(interrupt=a.interrupt)
        elif isinstance(a, lc.Submit):
            self._pending.append(self._submit(a.round))
        elif isinstance(a, lc.Publish) and self.uploads.in_flight(a.round, a.update_id):
            log.info("round %d: update %s still on its way to the broker: not published again", a.round,
                     a.update_id[:8])  # the client resends it after a reconnect (see .uploads)
        elif isinstance(a, lc.Publish):
            try:
                payload = self.folder.outbox.get(a.round, a.update_id)
            except DamagedFile as e:
                self._damaged_update(a.round, a.update_id, e)
            except StateFolderError as e:
                self._troubles.report("outbox", f"outbox: {e}; the update stays and is read again at its next "
                                      f"resend", self.clock())
            else:
                self._publish_update(a.round, a.update_id, payload)
                log.info("round %d: update %s published again", a.round, a.update_id[:8])
                self.probe("update-republished")
        elif isinstance(a, lc.DropUpdate):
            try:
                if self.folder.outbox.remove(a.round, a.update_id):
                    log.info("outbox: update %s of round %d removed", a.update_id[:8], a.round)
            except OSError as e:  # it stays on disk; a restart drops it, its round being over
                self._storage_failed(e)
        elif isinstance(a, lc.SaveDone):
            try:
                self.folder.save_done(Done(round=a.round, result=a.result))
            except OSError as e:
                self._deferred.append(a)
                self._storage_failed(e)
                return
            self._stored()
            self.probe("done-saved")
        elif isinstance(a, lc.PingWatchdog):
            if self.notifier.watchdog_interval:
                self.notifier.watchdog()
                self._timers.set(Timer.WATCHDOG, time.monotonic() + self.notifier.watchdog_interval)
        elif isinstance(a, lc.Telemetry):
            self._publish_status()
        elif isinstance(a, lc.Exit):
            self._exited = True

    def _damaged_update(self, rnd: int, uid: str, e: DamagedFile) -> None:
        try:
            aside = self.folder.move_aside(e.path)  # type: ignore[arg-type]
        except OSError as oe:
            self._storage_failed(oe)  # left in place; read again at its next resend
            return
        log.error("%s: moved to %s; round %d is submitted again from the trainer's checkpoint", e, aside, rnd)
        self._pending.append(lc.UpdateLost(rnd, uid, f"stored update damaged (moved to {aside.name})"))

    def _submit(self, rnd: int) -> lc.Event:
        ann = self.announcement
        if ann is not None and ann.header.round != rnd and self.inbox.previous is not None:
            ann = self.inbox.previous  # buffered rounds: the round a newer model interrupted
        blob: bytes | None = None
        try:
            if ann is None or ann.header.round != rnd:
                raise CheckpointMismatch(f"no announcement of round {rnd} at hand")
            blob = self.folder.load_checkpoint()
            if blob is None:
                raise CheckpointMismatch("no checkpoint to submit")
            dtype = ann.header.update_dtype or self.cfg.training.delta_dtype  # the federation's choice first
            feedback = ErrorFeedback(residual=load_residual(self.folder, round=rnd)) if dtype == "q8" else None
            if ann.header.secagg is not None:  # secure aggregation: a masked update (secure_site.py)
                uid, payload, progress = self.secure.build(announcement=ann, checkpoint=blob)
            else:
                uid, payload, progress = build_update(
                    announcement=ann, checkpoint=blob, site=self.cfg.site, signing_key=self.site_keys.signing,
                    coordinator_box=self.coordinator.box, dtype=dtype, feedback=feedback)
        except (CheckpointMismatch, WireError, StateFolderError, SecureAggregationRefused) as e:
            self._troubles.report("submit", f"cannot make the update of round {rnd}: {e}", self.clock())
            why = None if blob is None else checkpoint_damage(blob)
            if why is not None:
                try:
                    aside = self.folder.move_aside(self.folder.checkpoint_path)
                    log.error("the trainer's checkpoint is damaged (%s): moved to %s; round %d starts again from "
                              "the global model", why, aside, rnd)
                except OSError as oe:
                    self._storage_failed(oe)
            return lc.SubmitFailed(str(e))
        try:
            self.folder.outbox.put(rnd, uid, payload)
        except OSError as e:
            self._storage_failed(e)
            return lc.SubmitFailed(f"cannot store the update: {e.strerror or e}")
        if feedback is not None and feedback.left is not None:
            save_residual(self.folder, feedback.left, round=rnd)
        self._troubles.clear("submit")
        self._stored()
        log.info("round %d: update %s stored (%d steps of %d%s, %d bytes)", rnd, uid[:8], progress.steps,
                 progress.planned, ", partial" if progress.steps < progress.planned else "", len(payload))
        self.probe("update-stored")
        self._publish_update(rnd, uid, payload)
        self.probe("update-published")
        return lc.UpdateStored(rnd, uid)

    def _publish_update(self, rnd: int, uid: str, payload: bytes) -> None:
        try:
            handle = self.client.publish(self.topics.updates(self.cfg.site), payload, qos=1)
            self.uploads.add(handle, round=rnd, update_id=uid)
        except PayloadTooLarge as e:
            log.error("round %d: update %s can never be delivered: %s", rnd, uid[:8], e)
            self._pending.append(lc.ReceiptArrived(rnd, uid, False, "too_large"))
        except TransportError as e:
            log.warning("round %d: update %s not published now (%s); it stays in the outbox", rnd, uid[:8], e)

    # -- messages -------------------------------------------------------------------------------

    def _on_message(self, m: Message) -> None:
        try:
            parsed = self.topics.parse(m.topic)
            if parsed.kind == "round":
                self._on_announcement(m)
            elif parsed.kind == "model":
                self._on_announcement(m, whole=True)
            elif parsed.kind == "receipts" and parsed.site == self.cfg.site:
                self._on_receipt(m.payload)
        except TopicError as e:
            log.warning("message on an unexpected topic: %s", e)
        finally:
            self.client.ack(m)

    def _on_announcement(self, m: Message, *, whole: bool = False) -> None:
        """A round announcement, or (``whole``) the whole model of the ``model`` topic, which a
        site follows only while it lacks the base of the round's delta."""
        arrived = self.inbox.model_arrived if whole else self.inbox.announcement_arrived
        try:
            event = arrived(m.payload, state=self.state, now=self.clock(), wall=self.wall(), live=not m.retain)
        except OSError as e:  # held by the inbox, stored again later
            self._storage_failed(e)
            return
        finally:
            self._follow_model_topic(stray=whole)
        if event is not None:
            self._announced(event)

    def _follow_model_topic(self, *, stray: bool = False) -> None:
        """Subscribe to ``model`` while the inbox needs the whole model, and only then. ``stray``:
        a message came on it, so the broker holds the subscription even if this process did not
        make it (a persistent session that outlived a restart)."""
        topic = self.topics.model
        following = topic in self.client.subscriptions or stray
        try:
            if self.inbox.need_model and not following:
                self.client.subscribe(topic, qos=1)
            elif following and not self.inbox.need_model:
                self.client.unsubscribe(topic)
        except TransportError as e:
            log.warning("the model topic: %s; tried again with the next announcement", e)

    def _announced(self, event: lc.Announced) -> None:
        self._feed(event)
        self.secure.forget_before(event.round)  # an earlier round's seeds and round key are no longer needed
        if event.deadline <= self.clock() + lc.DEADLINE_RESOLUTION_S:
            log.info("round %d came after its deadline (the coordinator's final model, or a round already "
                     "closed): nothing to train", event.round)
        if self.inference is not None:
            assert self.inbox.announcement is not None
            self.inference.offer(self.inbox.announcement)

    def _on_receipt(self, payload: bytes) -> None:
        if kind_of(payload) == UNMASK_REQUEST:  # secure aggregation: answered once, stored first
            answer = self.secure.answer(payload)
            try:
                if answer is not None:
                    self.client.publish(self.topics.updates(self.cfg.site), answer, qos=1)
                    self.probe("unmask-answered")
            except TransportError as e:  # the coordinator asks again until it hears
                log.warning("unmask answer not published now (%s)", e)
            return
        event = self.inbox.receipt_arrived(payload)
        if event is not None:
            self._feed(event)

    # -- sensors and telemetry ------------------------------------------------------------------

    def _read_gates(self) -> bool:
        """Read the sensors and update the gates; True when they changed."""
        self._timers.set(Timer.GATES, time.monotonic() + self.cfg.gates.poll_s)
        readings = self.sensors.readings()
        gates = evaluate(self.cfg.gates, self._gates, readings)
        changed = gates.open != self._gates.open or gates.reasons != self._gates.reasons
        self._gates = gates
        self._readings = readings
        if changed:
            if gates.open:
                log.info("gates open: training may run")
            else:
                log.info("training paused: %s", ", ".join(gates.reasons))
        return changed

    def _snapshot(self, state: str | None = None) -> Snapshot:
        s = self.state
        procs = self.sensors.processes()
        r = self._readings
        return Snapshot(
            site=self.cfg.site, version=__version__, time=self.wall(), state=state or s.phase.value,
            round=None if s.round is None else s.round.round, steps=s.steps, planned=s.planned,
            samples_per_s=self.trainer.samples_per_s, chunk_s=self.trainer.chunk_s, gates=s.gate_reasons,
            cpu_percent=procs.cpu_percent, rss_bytes=procs.rss_bytes, memory_percent=self.sensors.memory_percent(),
            temperature_c=None if r is None else r.temperature_c,
            battery_percent=None if r is None else r.battery_percent,
            charging=None if r is None else r.charging,
            bytes_sent=self.client.bytes_sent, bytes_received=self.client.bytes_received,
            outbox=len(s.outbox), last_receipt=s.last_receipt,
            error=s.error or self._message_error or self._troubles.summary(),
            clock_offset_s=self.inbox.clock_offset_s,
            reconnects=self.client.reconnects, rtt_s=self.client.last_rtt_s,  # the link, for a slow one
        )

    def _publish_status(self) -> None:
        self._timers.set(Timer.TELEMETRY, time.monotonic() + self.cfg.telemetry.interval_s)
        snap = self._snapshot()
        self.notifier.status(status_line(snap))
        if not self.client.connected:
            return  # stale by the time it would arrive; a fresh one goes out on reconnect
        try:
            self.client.publish(self.topics.status(self.cfg.site), status_json(snap), qos=1, retain=True)
        except TransportError as e:
            log.warning("status not sent: %s", e)

