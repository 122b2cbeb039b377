"""Coordinator workers: update verification and durable storage spread over processes by MQTT 5
shared subscriptions, one aggregator owning the round.

Past what one process verifies, the broker spreads the work: N worker processes subscribe to
``$share/<group>/fednca/<federation>/updates/+`` and mosquitto hands each update to one of them
(round robin). A worker, for each update:

1. charges it to its site's budget (:mod:`.admission`, per worker);
2. unseals, verifies and checks it (:func:`.verifier.open_update_once`, once);
3. if it verified and names the current round (that of the newest model stored) or the next,
   writes the sealed payload durably into the store (``rounds/<r>/<site>-<update id>.bin``,
   where ``r`` is the round the update names); any other round is refused unstored, so that
   valid updates for rounds that will never count cannot fill the disk;
4. publishes a compact :class:`VerifiedRecord` (the header fields the round policy needs, the
   codec's verdict, the fingerprint of the site key it verified under, the delta as float32
   values and its norm) on the internal topic
   ``fednca/<federation>/verified/<worker>`` at QoS 1, and waits for the broker's PUBACK;
5. only then acknowledges the update to the broker.

Steps 1 to 3 are those of a coordinator on its own (:mod:`.intake`), a batch of updates at a time.

The aggregator is the :class:`.coordinator.Coordinator` of the federation, subscribed to
``verified/+`` instead of ``updates/+``: it judges each record with the round policy, counts,
receipts and logs exactly as for an update it opened itself, and takes the payload the worker
stored as its ``StoreUpdate`` (it checks the file is there). A record whose key is no longer the
site's (``enroll --replace`` since) is judged by opening the stored payload again with the
current registry, and the payload of a record the policy does not count is deleted. Nothing is
opened twice (but after a re-enrolment or a restart), and no update is lost to a crash of a
worker, of the aggregator or of the broker: a worker killed before step 5 leaves the update
unacknowledged in its persistent session, and mosquitto delivers it again when the worker is back
(the supervisor, :func:`supervise`, restarts it at once with the same client id); one killed after
step 4 leaves a record that the policy counts once (a re-delivery of an update id is acknowledged,
not counted). The aggregator acknowledges a record only once its verdict is durable. mosquitto
writes its queues to disk only every autosave interval, so a broker crash can lose a record
whose update step 5 acknowledged; the payload is stored, though, and a restarted aggregator opens
and judges every payload of the open round that the round log does not count (a record still on
its way is then a re-delivery). An update lost that way is counted only when the aggregator
restarts, so restart it with the broker.

A worker's session outlives its process and stays in the shared subscription, so ``run`` with
fewer workers than before first retires the others (:func:`retire_workers`): drained, then ended.

The internal topic crosses the broker, which the design does not trust with content: each
record carries an HMAC-SHA256 under a key only the coordinator's processes hold
(``keys/workers.key``, made once, 0600). The ACL gives ``verified/+`` to the worker accounts
(write) and the coordinator's (read) alone; each worker has its own broker account
(``<coordinator user>-w<i>``), whose client id is its user name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fednca.atomic import fsync_dir, write_text
from fednca.keys import CoordinatorKeys, Registry, key_id
from fednca.rounds_vocab import Reason, RoundReason, reject_reason
from fednca.topics import Rule, Topics, TopicError

from .errors import BrokerError
from .intake import Intake, PayloadWriter, take_batch
from .round_events import UpdateRejected, UpdateVerified
from .store import RoundStore
from .verifier import VERIFY_THREADS, Opened, Verifier

log = logging.getLogger("fednca.coordinator.worker")

MAGIC = b"FNV1"
KEY_NAME = "workers.key"
GROUP = "fednca-coordinator"  # the shared subscription's group name


class RecordError(BrokerError):
    """A verified record that is not one a worker of this coordinator made."""


def worker_user(coordinator_user: str, index: int) -> str:
    """The broker account (and client id) of worker ``index`` (1, 2, ...)."""
    return f"{coordinator_user}-w{index}"


def worker_users(coordinator_user: str, count: int) -> list[str]:
    return [worker_user(coordinator_user, i) for i in range(1, count + 1)]


def shared_updates(federation: str, group: str = GROUP) -> str:
    """The workers' shared subscription to every site's updates."""
    return f"$share/{group}/{Topics(federation).all_updates}"


def verified_topic(federation: str, worker: str) -> str:
    return f"{Topics(federation).prefix}verified/{worker}"


def verified_filter(federation: str) -> str:
    return f"{Topics(federation).prefix}verified/+"


def worker_rules(federation: str) -> tuple[Rule, ...]:
    """A worker's ACL: read the sites' updates (through the shared subscription), write records."""
    t = Topics(federation)
    return (Rule("read", t.all_updates), Rule("write", verified_filter(federation)))


def aggregator_rules(federation: str) -> tuple[Rule, ...]:
    """What the coordinator's account needs beyond its own rules when workers run."""
    return (Rule("read", verified_filter(federation)),)


def record_key(keys_dir: Path) -> bytes:
    """The record key of the coordinator's processes (``keys/workers.key``), made on first use:
    written whole to a temporary file, then linked into place, so that of two processes making it
    at once one key wins and both read that one."""
    path = Path(keys_dir) / KEY_NAME
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{KEY_NAME}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        fsync_dir(path.parent)
    data = path.read_bytes()
    if len(data) != 32 or path.stat().st_mode & 0o077:
        raise RecordError(f"{path}: must be 32 bytes, readable by its owner only")
    return data


# -- the record ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedRecord:
    """What a worker tells the aggregator about one update message."""

    worker: str
    opened: Opened
    key_id: str = ""  # the fingerprint of the site key the update verified under ("" when rejected)

    def encode(self, key: bytes) -> bytes:
        e = self.opened.event
        if isinstance(e, UpdateVerified):
            head: dict[str, Any] = {"worker": self.worker, "verdict": "verified", "site": e.site,
                                    "update_id": e.update_id, "round": e.round, "base_sha256": e.base_sha256,
                                    "samples": e.samples, "steps": e.steps, "partial": e.partial,
                                    "metrics": dict(e.metrics), "norm": self.opened.norm,
                                    "key_id": self.key_id}  # fmt: skip
            row = b"" if self.opened.row is None else self.opened.row.astype("<f4").tobytes()
        else:
            head = {"worker": self.worker, "verdict": "rejected", "site": e.site, "update_id": e.update_id,
                    "round": e.round, "reason": str(e.reason.value if hasattr(e.reason, "value") else e.reason)}
            row = b""
        text = json.dumps(head, sort_keys=True, allow_nan=False).encode()
        body = MAGIC + struct.pack(">I", len(text)) + text + row
        return body + hmac.new(key, body, hashlib.sha256).digest()

    @classmethod
    def decode(cls, data: bytes, key: bytes, *, size: int) -> "VerifiedRecord":
        """The record in ``data``; ``size`` the values of a delta row. RecordError if it is not a
        whole record under ``key``."""
        if len(data) < len(MAGIC) + 4 + 32 or not data.startswith(MAGIC):
            raise RecordError("not a verified record")
        body, mac = data[:-32], data[-32:]
        if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
            raise RecordError("the record's HMAC does not match the coordinator's record key")
        (n,) = struct.unpack(">I", body[4:8])
        try:
            head = json.loads(body[8 : 8 + n])
            row_bytes = body[8 + n :]
            if head["verdict"] == "verified":
                if len(row_bytes) != 4 * size:
                    raise RecordError(f"a delta of {len(row_bytes) // 4} values, expected {size}")
                row = np.frombuffer(row_bytes, dtype="<f4").astype(np.float32)
                event = UpdateVerified(head["site"], head["update_id"], int(head["round"]), head["base_sha256"],
                                       int(head["samples"]), int(head["steps"]), bool(head["partial"]),
                                       {str(k): float(v) for k, v in head["metrics"].items()})  # fmt: skip
                norm = float(head["norm"])
                if not math.isfinite(norm):
                    raise RecordError("the norm is not finite")
                return cls(worker=str(head["worker"]), opened=Opened(event, row, norm), key_id=str(head["key_id"]))
            event_r = UpdateRejected(head["site"], head["update_id"], reject_reason(head["reason"]), head["round"])
            return cls(worker=str(head["worker"]), opened=Opened(event_r))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordError(f"a malformed record ({e})") from None


# -- the worker ------------------------------------------------------------------------------------


class Worker:
    """One worker process's loop: take shared updates, verify, store, forward, acknowledge.

    ``registry`` is public: the process replaces it when the registry file changes."""

    def __init__(
        self, *, name: str, federation: str, client: Any, store: RoundStore, keys: CoordinatorKeys,
        registry: Registry, key: bytes, shapes: Mapping[str, tuple[int, ...]], max_update_bytes: int,
        clock: Callable[[], float] = time.time, batch: int = 64, verify_threads: int = VERIFY_THREADS,
        publish_timeout: float = 30.0, after_action: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.registry = registry
        self.forwarded = 0
        self._federation = federation
        self._client = client
        self._key = key
        self._clock = clock
        self._batch = batch
        self._timeout = publish_timeout
        self._topics = Topics(federation)
        self._verifier = Verifier(threads=verify_threads)
        self._intake = Intake(federation=federation, box_keys=[keys.box], shapes=shapes,
                              max_update_bytes=max_update_bytes, verifier=self._verifier)  # fmt: skip
        self._store = store
        self._writer = PayloadWriter(store=store)
        self._after = after_action or (lambda name: None)  # hears "Stored", "Forwarded", "Acked" (crash tests)

    def start(self, timeout: float = 10.0) -> None:
        self._client.connect(timeout)
        self._client.subscribe(shared_updates(self._federation), 1)

    def step(self, timeout: float = 0.0) -> int:
        """Handle up to ``batch`` waiting updates (the first waited for up to ``timeout`` s)."""
        messages = take_batch(self._client, batch=self._batch, timeout=timeout, take=lambda m: m)
        if not messages:
            return 0
        registry, window = self.registry, self._rounds()
        jobs = []
        for m in messages:
            try:
                parsed = self._topics.parse(m.topic)
            except TopicError:
                parsed = None
            if parsed is None or parsed.kind != "updates" or parsed.site is None:
                jobs.append(None)  # not an update topic (the ACL allows none): acknowledged, dropped
                continue
            if not self._intake.admit(parsed.site, "updates", len(m.payload), self._clock(), self.registry):
                jobs.append(None)  # over its site's budget: acknowledged, nothing else
                continue
            jobs.append(self._intake.submit(parsed.site, m.payload, registry))
        opened = [None if j is None else refuse_round(j.result(), window) for j in jobs]
        stored = [(o.event.round, o.event.site, o.event.update_id, m.payload) for o, m in zip(opened, messages)
                  if o is not None and isinstance(o.event, UpdateVerified)]  # fmt: skip
        if stored:
            self._writer.write(stored)
            self._after("Stored")
        handles = [self._client.publish(verified_topic(self._federation, self.name),
                                        VerifiedRecord(self.name, o, signed_by(o, registry)).encode(self._key), qos=1)
                   for o in opened if o is not None]  # fmt: skip
        for h in handles:
            h.result(self._timeout)  # the broker holds the record: the update may be acknowledged
        self._after("Forwarded")
        for m in messages:
            self._client.ack(m)
        self._after("Acked")
        self.forwarded += len(handles)
        log.debug("worker %s: %d forwarded (%d in all)", self.name, len(handles), self.forwarded)
        return len(messages)

    def _rounds(self) -> tuple[int, int]:
        """The rounds an update may name: the current one (that of the newest model stored) and the
        next (its model may be saved before this worker looks again)."""
        stored = self._store.model_rounds()
        current = stored[-1] if stored else 1
        return current, current + 1

    def close(self) -> None:
        self._verifier.close()
        self._writer.close()


def refuse_round(opened: Opened, window: tuple[int, int]) -> Opened:
    """``opened``, or its refusal when it verified but names a round outside ``window``: such a
    payload is never stored, so no site can fill the disk with updates for rounds long past or
    far ahead (the round policy would refuse them for the same reasons)."""
    e = opened.event
    if not isinstance(e, UpdateVerified) or window[0] <= e.round <= window[1]:
        return opened
    reason = Reason.STALE_ROUND if e.round < window[0] else RoundReason.UNKNOWN_ROUND
    return Opened(UpdateRejected(e.site, e.update_id, reason, e.round))


def signed_by(opened: Opened, registry: Registry) -> str:
    """The fingerprint of the key ``registry`` holds for the site of a verified update (the key
    it verified under); the aggregator counts the record only while that is still the site's key."""
    key = registry.verify_key(opened.event.site) if isinstance(opened.event, UpdateVerified) else None
    return "" if key is None else key_id(key)


# -- running workers beside the aggregator --------------------------------------------------------


@dataclass
class Supervised:
    index: int
    process: Any  # subprocess.Popen
    restarts: int = 0


def supervise(commands: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None,
              once: Sequence[str] = ()) -> "Supervisor":
    """Start one process per command; :meth:`Supervisor.check` restarts any that died (without
    the environment variables ``once`` names)."""
    return Supervisor(commands, env=env, once=once)


class Supervisor:
    """Worker processes that the aggregator's loop keeps running: a worker that exits (or is
    killed) is started again with the same command, so its persistent session, and the updates
    it held unacknowledged, come back."""

    def __init__(self, commands: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None,
                 once: Sequence[str] = ()) -> None:
        import subprocess

        self._popen = subprocess.Popen
        self._commands = [list(c) for c in commands]
        self._env = dict(os.environ if env is None else env)
        self.workers = [Supervised(i, self._popen(c, env=self._env)) for i, c in enumerate(self._commands)]
        for name in once:  # variables for the first start only (a test's kill hook)
            self._env.pop(name, None)

    def check(self) -> list[int]:
        """Restart the workers that exited; return their indices."""
        restarted = []
        for w in self.workers:
            if w.process.poll() is not None:
                log.warning("worker %d exited with %s; starting it again", w.index + 1, w.process.returncode)
                w.process = self._popen(self._commands[w.index], env=self._env)
                w.restarts += 1
                restarted.append(w.index)
        return restarted

    def stop(self, timeout: float = 10.0) -> None:
        import signal
        import subprocess

        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()


# -- accounts and the worker process ---------------------------------------------------------------


def worker_password_path(folder: Path, user: str) -> Path:
    return Path(folder) / "secrets" / f"{user}-mqtt-password"


def worker_passwords(cfg: Any) -> dict[str, str]:
    """The broker accounts of the ``mosquitto.workers`` workers with their passwords, each made
    (0600, in ``secrets/``) where missing: ``broker-config`` writes them into mosquitto's files."""
    from .clients import read_secret

    out = {}
    for user in worker_users(cfg.broker.username or "coordinator", cfg.mosquitto.workers):
        path = worker_password_path(cfg.folder, user)
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_text(path, secrets.token_urlsafe(24) + "\n", mode=0o600)
        out[user] = read_secret(cfg, path, key=f"worker {user}")
    return out


def _worker_client(cfg: Any, user: str, *, clean_start: bool) -> Any:
    """An (unconnected) client of worker account ``user``; its client id is the user name."""
    from fednca.transport.mqtt import MqttClient, TLSOptions

    from .clients import read_secret

    b = cfg.broker
    tls = TLSOptions(b.ca_file, b.cert_file, b.key_file) if b.url.startswith("mqtts://") else None
    return MqttClient(url=b.url, client_id=user, username=user,
                      password=read_secret(cfg, worker_password_path(cfg.folder, user), key=f"worker {user}"),
                      tls=tls, keepalive=b.keepalive, max_packet_size=b.max_packet_size, protocol=b.protocol,
                      clean_start=clean_start)  # fmt: skip


def _open_worker(cfg: Any, index: int, *, after_action: Callable[[str], None] | None = None) -> tuple["Worker", Any]:
    """Worker ``index`` of the federation configured by ``cfg`` and its (unconnected) client."""
    from fednca.keys import read_coordinator_keys, read_registry
    from fednca.wire import max_update_bytes

    if not 1 <= index <= cfg.mosquitto.workers:
        raise BrokerError(f"worker {index}: the configuration has broker accounts for workers 1 to "
                          f"{cfg.mosquitto.workers} (mosquitto.workers; then run fednca coordinator broker-config)")
    user = worker_user(cfg.broker.username or "coordinator", index)
    client = _worker_client(cfg, user, clean_start=False)
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    rounds = store.model_rounds()
    if not rounds:
        raise BrokerError(f"{store.folder}: no global model yet; start the coordinator first")
    shapes = {name: tuple(a.shape) for name, a in store.load_model(rounds[0]).items()}
    worker = Worker(name=user, federation=cfg.federation.name, client=client, store=store,
                    keys=read_coordinator_keys(cfg.keys_dir), registry=read_registry(cfg.registry_path),
                    key=record_key(cfg.keys_dir), shapes=shapes, max_update_bytes=max_update_bytes(shapes),
                    after_action=after_action)  # fmt: skip
    return worker, client


def run_worker(folder: Path, index: int, *, poll: float = 1.0, stop: Callable[[], bool] = lambda: False,
               after_action: Callable[[str], None] | None = None) -> int:
    """One worker process of the federation in ``folder`` (``fednca coordinator worker``): until
    ``stop()`` holds, take shared updates; the registry is read again when its file changes."""
    from fednca.keys import read_registry

    from .config import CONFIG_NAME, load_config

    cfg = load_config(Path(folder) / CONFIG_NAME)
    worker, client = _open_worker(cfg, index, after_action=after_action)
    registry_path = cfg.registry_path
    seen = registry_path.stat().st_mtime_ns
    worker.start()
    log.info("worker %s: sharing %s", worker.name, shared_updates(cfg.federation.name))
    try:
        while not stop():
            worker.step(poll)
            mtime = registry_path.stat().st_mtime_ns
            if mtime != seen:
                seen, worker.registry = mtime, read_registry(registry_path)
    finally:
        worker.close()
        client.disconnect()
    return 0


def retire_workers(folder: Path, first: int, *, quiet: float = 1.0, timeout: float = 10.0) -> int:
    """Empty and end the broker sessions of worker accounts ``first`` up to ``mosquitto.workers``
    (``run --workers N`` retires those past N); return how many updates they still held.

    A worker's session is persistent (7 days) and stays a member of the shared subscription while
    its process is gone, so mosquitto keeps handing it its share of the updates, which nobody would
    take. Ending the session at once (a clean start) would not hand them back: mosquitto 2.0
    discards the messages queued for a session it ends. So each account is first drained as a
    worker: it leaves the shared subscription (no new updates come to it; those queued still do),
    handles what it is handed until ``quiet`` s pass without a message (verified, stored,
    forwarded to the aggregator, acknowledged), and only then is its session ended. An account the
    broker does not let in within ``timeout`` s is left as it is, with a warning."""
    from .config import CONFIG_NAME, load_config

    cfg = load_config(Path(folder) / CONFIG_NAME)
    handed = 0
    for index in range(max(first, 1), cfg.mosquitto.workers + 1):
        user = worker_user(cfg.broker.username or "coordinator", index)
        if not worker_password_path(cfg.folder, user).exists():
            continue  # never given a password: the broker never had this account
        worker, client = _open_worker(cfg, index)
        before = handed
        try:
            if not client.connect(timeout):
                log.warning("worker %s: the broker did not let it in (%s); its session, if any, is kept",
                            user, client.last_error)
                continue
            client.unsubscribe(shared_updates(cfg.federation.name))
            while (n := worker.step(quiet)) > 0:
                handed += n
        finally:
            worker.close()
            client.disconnect()
        ender = _worker_client(cfg, user, clean_start=True)  # session expiry 0: ends with this connection
        if ender.connect(timeout):
            ender.disconnect()
            log.info("worker %s: retired (%d updates handed over)", user, handed - before)
        else:
            log.warning("worker %s: drained, but the broker did not let it in to end its session", user)
    return handed
