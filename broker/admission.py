"""Per-site admission: a token bucket per enrolled site, on messages and on bytes.

Every message a site publishes reaches the coordinator's one MQTT session, and mosquitto keeps
that session's queue bounded (``max_queued_messages``): when it overflows, mosquitto drops QoS 1
messages it has already acknowledged to their senders, whoever they came from. A site that floods
therefore costs the other sites their updates unless the coordinator drains its queue faster than
the flood fills it. Unsealing and verifying an update costs a few milliseconds of crypto and a
signed receipt; a flood must not get that far.

So, after the topic check and before the codec, each message is charged to its site's bucket of
its kind (``updates`` or ``status``: a site's chatty telemetry never spends its updates' budget):
one token of the message bucket and ``len(payload)`` tokens of the byte bucket. A message that
finds either bucket short is *refused*: the coordinator acknowledges it to the broker (so the
queue drains) and counts it, and does nothing else: no unsealing, no receipt, no durable write.
Every other site's buckets are untouched, so its messages are handled normally.

The budgets come from what an honest site sends (:func:`budgets_for`): one update per round and
a few resends of it when no receipt comes back; telemetry every interval (60 s by default) and
after each training chunk (a few seconds, 0.2 s in the tests). They are sized twice over for
:data:`UPDATE_SENDS_PER_MINUTE` updates a minute and a status every :data:`FASTEST_TELEMETRY_S`:
well above an honest site, far below a flood of thousands. A refused honest update is not lost
for good: the daemon publishes it again when no receipt arrives.

Pure: the clock reading is passed to every call; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

# What an honest site may send, at most, that the budgets are sized for (twice over).
FASTEST_TELEMETRY_S = 0.2  # a status after every training chunk of the shortest length
UPDATE_SENDS_PER_MINUTE = 8  # an update and its resends (rounds of a minute or less)
BURST_SECONDS = 60.0  # a full bucket holds a minute of that
UPDATES, STATUS = "updates", "status"  # the kinds of message charged, each to a bucket of its own


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A site's allowance: each bucket holds up to ``burst_*`` and refills at ``*_per_s``."""

    burst_messages: float
    messages_per_s: float
    burst_bytes: float
    bytes_per_s: float

    def __post_init__(self) -> None:
        for name in ("burst_messages", "messages_per_s", "burst_bytes", "bytes_per_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")


def _per_minute(messages: float, largest: int) -> Budget:
    burst = 2 * messages  # twice what an honest site sends in BURST_SECONDS
    return Budget(burst_messages=burst, messages_per_s=burst / BURST_SECONDS,
                  burst_bytes=burst * largest, bytes_per_s=burst * largest / BURST_SECONDS)  # fmt: skip


def budgets_for(*, max_update_bytes: int, status_max_bytes: int) -> dict[str, Budget]:
    """Each kind's budget for one site of a federation whose updates are at most
    ``max_update_bytes`` and status messages at most ``status_max_bytes``."""
    if max_update_bytes < 1 or status_max_bytes < 1:
        raise ValueError("message sizes must be positive")
    return {UPDATES: _per_minute(UPDATE_SENDS_PER_MINUTE, max_update_bytes),
            STATUS: _per_minute(BURST_SECONDS / FASTEST_TELEMETRY_S, status_max_bytes)}  # fmt: skip


@dataclass(frozen=True)
class Bucket:
    """The tokens a site has left at clock reading ``at``."""

    messages: float
    bytes: float
    at: float

    @classmethod
    def full(cls, budget: Budget, now: float) -> "Bucket":
        return cls(budget.burst_messages, budget.burst_bytes, now)


def take(bucket: Bucket, budget: Budget, size: int, now: float) -> tuple[Bucket, bool]:
    """Refill ``bucket`` to ``now`` and charge one message of ``size`` bytes: the new bucket, and
    whether the message is admitted. A refused message takes nothing, so a flood that stops is
    admitted again as soon as the buckets refill. A clock that goes back refills nothing."""
    elapsed = max(0.0, now - bucket.at)
    messages = min(budget.burst_messages, bucket.messages + elapsed * budget.messages_per_s)
    size_tokens = min(budget.burst_bytes, bucket.bytes + elapsed * budget.bytes_per_s)
    at = max(now, bucket.at)
    if messages >= 1.0 and size_tokens >= size:
        return Bucket(messages - 1.0, size_tokens - size, at), True
    return Bucket(messages, size_tokens, at), False


@dataclass(frozen=True)
class Refused:
    """What one site has had refused since the coordinator started."""

    messages: int = 0
    bytes: int = 0


class Admission:
    """The buckets of every site that has sent something, one per kind, and what each site has
    had refused.

    Buckets exist only for the sites named to :meth:`admit`; the coordinator passes the enrolled
    sites' ids (ACLs confine each site to its own topics) and :meth:`forget` drops a revoked one.
    """

    def __init__(self, *, budgets: Mapping[str, Budget]) -> None:
        self.budgets = dict(budgets)
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._refused: dict[str, Refused] = {}

    def admit(self, site: str, kind: str, size: int, now: float) -> bool:
        """Charge one message of ``kind`` and ``size`` bytes from ``site``; False: refuse it (and
        count it). A kind without a budget is admitted."""
        budget = self.budgets.get(kind)
        if budget is None:
            return True
        bucket = self._buckets.get((site, kind)) or Bucket.full(budget, now)
        self._buckets[(site, kind)], admitted = take(bucket, budget, size, now)
        if not admitted:
            was = self._refused.get(site, Refused())
            self._refused[site] = Refused(was.messages + 1, was.bytes + size)
        return admitted

    def refused(self, site: str) -> Refused:
        return self._refused.get(site, Refused())

    def forget(self, site: str) -> None:
        for kind in self.budgets:
            self._buckets.pop((site, kind), None)
