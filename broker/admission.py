"""Per-site admission: a token bucket per enrolled site, on messages and on bytes.

Every message a site publishes reaches the coordinator's one MQTT session, and mosquitto keeps
that session's queue bounded (``max_queued_messages``): when it overflows, mosquitto drops QoS 1
messages it has already acknowledged to their senders, whoever they came from. A site that floods
therefore costs the other sites their updates unless the coordinator drains its queue faster than
the flood fills it. Unsealing and verifying an update costs a few milliseconds of crypto and a
signed receipt; a flood must not get that far.

So, after the topic check and before the codec, each message is charged to its site's bucket:
one token of the message bucket and ``len(payload)`` tokens of the byte bucket. A message that
finds either bucket short is *refused*: the coordinator acknowledges it to the broker (so the
queue drains) and counts it, and does nothing else: no unsealing, no receipt, no durable write.
Every other site's buckets are untouched, so its messages are handled normally.

The budget comes from what an honest site sends (:func:`budget_for`): one update per round, a
few resends of it when no receipt comes back, and telemetry every few seconds (the daemon's
default is every 60 s, plus one on each state change). The budget is sized for a site that
reports every second and resends its update several times in a minute: an order of magnitude
above an honest site, far below a flood of thousands. A refused honest message is not lost for
good: the daemon publishes its update again when no receipt arrives.

Pure: the clock reading is passed to every call; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

# What an honest site may send, at most, that the budget is sized for.
FASTEST_TELEMETRY_S = 1.0  # one status message a second (the daemon's default is one a minute)
BURST_SECONDS = 60.0  # a full bucket holds a minute of that
UPDATE_SENDS_PER_BURST = 8  # an update and its resends within one burst window


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


def budget_for(*, max_update_bytes: int, status_max_bytes: int) -> Budget:
    """The budget of one site of a federation whose updates are at most ``max_update_bytes`` and
    status messages at most ``status_max_bytes``.

    Messages: telemetry every :data:`FASTEST_TELEMETRY_S` plus :data:`UPDATE_SENDS_PER_BURST`
    update sends in :data:`BURST_SECONDS`, twice over (state changes send status too); bytes: the
    same messages at their largest.
    """
    if max_update_bytes < 1 or status_max_bytes < 1:
        raise ValueError("message sizes must be positive")
    status_per_burst = BURST_SECONDS / FASTEST_TELEMETRY_S
    messages = 2 * (status_per_burst + UPDATE_SENDS_PER_BURST)
    size = 2 * (status_per_burst * status_max_bytes + UPDATE_SENDS_PER_BURST * max_update_bytes)
    return Budget(burst_messages=messages, messages_per_s=messages / BURST_SECONDS,
                  burst_bytes=size, bytes_per_s=size / BURST_SECONDS)  # fmt: skip


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
    """The buckets of every site that has sent something, and what each has had refused.

    Buckets exist only for the sites named to :meth:`admit`; the coordinator passes the enrolled
    sites' ids (ACLs confine each site to its own topics) and :meth:`forget` drops a revoked one.
    """

    def __init__(self, *, budget: Budget) -> None:
        self.budget = budget
        self._buckets: dict[str, Bucket] = {}
        self._refused: dict[str, Refused] = {}

    def admit(self, site: str, size: int, now: float) -> bool:
        """Charge one message of ``size`` bytes from ``site``; False: refuse it (and count it)."""
        bucket = self._buckets.get(site) or Bucket.full(self.budget, now)
        self._buckets[site], admitted = take(bucket, self.budget, size, now)
        if not admitted:
            was = self._refused.get(site, Refused())
            self._refused[site] = Refused(was.messages + 1, was.bytes + size)
        return admitted

    def refused(self, site: str) -> Refused:
        return self._refused.get(site, Refused())

    def forget(self, site: str) -> None:
        self._buckets.pop(site, None)
