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
(the supervisor, :func:`.worker_process.supervise`, restarts it at once with the same client
id); one killed after step 4 leaves a record that the policy counts once (a re-delivery of an
update id is acknowledged, not counted). The aggregator acknowledges a record only once its
verdict is durable. mosquitto writes its queues to disk only every autosave interval, so a broker
crash can lose a record whose update step 5 acknowledged; the payload is stored, though, and a
restarted aggregator opens and judges every payload of the open round that the round log does
not count (a record still on its way is then a re-delivery). An update lost that way is counted
only when the aggregator restarts, so restart it with the broker.

A worker's session outlives its process and stays in the shared subscription, so ``run`` with
fewer workers than before first retires the others (:func:`.worker_process.retire_workers`):
drained, then ended.

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
from typing import Any, Callable, Mapping

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
