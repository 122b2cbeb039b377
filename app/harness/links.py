"""Bad links as data: a link profile, and when each chunk of bytes crosses the link.

A clinic's link is slow, far away and sometimes gone. A :class:`Profile` says how, per direction
("up" is site to broker, "down" is broker to site): a bandwidth cap, a one-way latency and its
jitter; when the link is down (every ``every_s`` seconds for ``for_s`` seconds, or explicit
windows); whether it cuts a connection in the middle of a packet; and whether a connection tried
while the link is down is refused or held until it comes back. Profiles are read from a small
YAML file (:func:`load_profile`) or taken by name from :data:`BUILT_IN` ("2g", "satellite",
"clinic-dsl").

Everything here is pure: times are seconds on a clock the caller reads (relative to the link's
start), randomness comes from generators seeded by the profile, and nothing sleeps or touches a
socket, so the schedule is tested on a fake clock. The socket side is :mod:`.link_proxy`.

How a chunk crosses one direction (:class:`Lane`):

* a token bucket of ``burst_bytes`` refilled at the cap: a chunk leaves once the bucket holds its
  bytes, so N bytes beyond a full bucket take N*8/rate seconds;
* a delay line: it arrives ``latency_ms`` plus a uniform jitter in [-jitter_ms, +jitter_ms] later
  (never negative), and never before the chunk ahead of it, since TCP delivers in order;
* outages (:class:`OutagePlan`) do not delay bytes: a connection open when an outage starts is
  dropped with whatever it had in flight, as a real link's connection dies with its route.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from fednca.errors import ConfigError
from fednca.settings import BAD, Parser, between, key

__all__ = ["BUILT_IN", "Cuts", "Cutter", "Direction", "Lane", "Outages", "OutagePlan", "Profile", "load_profile",
           "parse_profile", "profile"]


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0, got {v!r}"


@dataclass(frozen=True, kw_only=True)
class Direction:
    """One direction of a link."""

    kbit_s: float | None = key(None, doc="bandwidth cap in kbit/s (1 kbit = 1000 bit); none: no cap",
                               check=_positive)
    latency_ms: float = key(0.0, doc="one-way latency in ms (half the round-trip time)", check=between(0, 600_000))
    jitter_ms: float = key(0.0, doc="uniform jitter in ms added to or taken from the latency",
                           check=between(0, 600_000))
    burst_bytes: int = key(1500, doc="token-bucket depth: bytes that may leave at once after a quiet spell",
                           check=between(1, 1 << 30))

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.kbit_s is None else self.kbit_s * 1000.0 / 8.0


@dataclass(frozen=True, kw_only=True)
class Outages:
    """When the link is down, in seconds from its start: periodic, explicit windows, or both."""

    every_s: float | None = key(None, doc="a periodic outage begins every this many seconds; none: no period",
                                check=_positive)
    for_s: float = key(0.0, doc="how long each periodic outage lasts", check=between(0, 1e9))
    first_s: float | None = key(None, doc="when the first periodic outage begins (default: every_s)",
                                check=between(0, 1e9))
    windows: tuple[tuple[float, float], ...] = key((), doc="explicit outages, a list of [start_s, end_s]")
    refuse: bool = key(True, doc="refuse connections tried while down; false: hold them until the link is up")

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        if self.every_s is not None and not 0 < self.for_s < self.every_s:
            problems.append(("for_s", f"must be > 0 and < every_s ({self.every_s}), got {self.for_s}"))
        if self.every_s is None and (self.for_s or self.first_s is not None):
            problems.append(("every_s", "required when for_s or first_s is given"))
        for i, (start, end) in enumerate(self.windows):
            if not 0 <= start < end:
                problems.append((f"windows[{i}]", f"must be [start_s, end_s] with 0 <= start_s < end_s, "
                                                  f"got {[start, end]}"))
        if problems:
            raise ConfigError.collected(problems)


@dataclass(frozen=True, kw_only=True)
class Cuts:
    """Connections cut in the middle of what they carry (the peer sees half a packet, then EOF)."""

    per_kb: float = key(0.0, doc="probability that a connection is cut within each KiB it carries",
                        check=between(0, 1))
    at_byte: int | None = key(None, doc="cut a connection once it has carried this many bytes",
                              check=between(1, 1 << 40))
    connections: int = key(1, doc="how many of the link's first connections the at_byte cut hits",
                           check=between(0, 1 << 30))
    direction: Literal["up", "down", "both"] = key("up", doc="which direction's bytes count and are cut")


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A link: both directions, its outages, its cuts, and the seed of its randomness."""

    name: str = key("custom", doc="a name for logs and reports")
    up: Direction = key(Direction, doc="site to broker")
    down: Direction = key(Direction, doc="broker to site")
    outages: Outages = key(Outages, doc="when the link is down")
    cuts: Cuts = key(Cuts, doc="connections cut mid-message")
    seed: int = key(0, doc="seed of the jitter and the random cuts")


def _symmetric(*, name: str, kbit_s: float, rtt_ms: float, jitter_ms: float, outages: Outages,
               up_kbit_s: float | None = None) -> Profile:
    half = rtt_ms / 2
    return Profile(name=name, outages=outages,
                   up=Direction(kbit_s=up_kbit_s or kbit_s, latency_ms=half, jitter_ms=jitter_ms),
                   down=Direction(kbit_s=kbit_s, latency_ms=half, jitter_ms=jitter_ms))


BUILT_IN: dict[str, Profile] = {
    # A 2G/EDGE data link: 64 kbit/s, 800 ms round trip, a 20 s outage every 3 minutes.
    "2g": _symmetric(name="2g", kbit_s=64, rtt_ms=800, jitter_ms=100,
                     outages=Outages(every_s=180.0, for_s=20.0)),
    # Geostationary satellite: 2 Mbit/s down, 256 kbit/s up, 600 ms round trip, a 5 s fade every 10 min.
    "satellite": _symmetric(name="satellite", kbit_s=2000, up_kbit_s=256, rtt_ms=600, jitter_ms=30,
                            outages=Outages(every_s=600.0, for_s=5.0)),
    # A clinic's ADSL line: 1 Mbit/s down, 256 kbit/s up, 40 ms round trip, 30 s down every hour.
    "clinic-dsl": _symmetric(name="clinic-dsl", kbit_s=1000, up_kbit_s=256, rtt_ms=40, jitter_ms=5,
                             outages=Outages(every_s=3600.0, for_s=30.0)),
}


def parse_profile(data: Any, *, source: str | None = None) -> Profile:
    """A profile from a YAML mapping; one ConfigError names every bad key. A mapping with
    ``base: NAME`` starts from that built-in profile and overrides the sections it gives."""
    if isinstance(data, dict) and "base" in data:
        data = dict(data)
        base = data.pop("base")
        if base not in BUILT_IN:
            raise ConfigError("base", f"must be one of {', '.join(map(repr, BUILT_IN))}, got {base!r}", source=source)
        plain = _plain(BUILT_IN[base])
        for name, value in data.items():
            plain[name] = {**plain[name], **value} if isinstance(value, dict) and isinstance(plain.get(name), dict) \
                else value
        data = plain
    parser = Parser()
    result = parser.section(Profile, data, "")
    parser.problems.raise_if_any(source)
    assert result is not BAD
    return result


def _plain(p: Profile) -> dict[str, Any]:
    out = dataclasses.asdict(p)
    out["outages"]["windows"] = [list(w) for w in p.outages.windows]
    return out


def load_profile(path: Path) -> Profile:
    """A profile from a YAML file."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("(file)", f"cannot read: {e}", source=str(path)) from e
    return parse_profile(data, source=str(path))


def profile(name_or_path: str) -> Profile:
    """A built-in profile by name, else the YAML file at that path."""
    return BUILT_IN[name_or_path] if name_or_path in BUILT_IN else load_profile(Path(name_or_path))


# ------------------------------------------------------------------------------------- schedule


class OutagePlan:
    """The outage windows of one link: the profile's, plus any added while it runs (:meth:`add`)."""

    def __init__(self, *, outages: Outages) -> None:
        self.outages = outages
        self._extra: list[tuple[float, float]] = []

    def add(self, start: float, end: float) -> None:
        if not start < end:
            raise ValueError(f"an outage must end after it starts: {start}, {end}")
        self._extra.append((start, end))

    def end_added(self, t: float) -> None:
        """End at ``t`` the added outages under way (the profile's own windows stay as they are)."""
        clipped = [(s, t if s <= t < e else e) for s, e in self._extra]
        self._extra = [(s, e) for s, e in clipped if s < e]

    def _candidates(self, t: float) -> list[tuple[float, float]]:
        """The windows that end after ``t``: explicit ones, and the current and next periodic ones."""
        out = [w for w in (*self.outages.windows, *self._extra) if w[1] > t]
        o = self.outages
        if o.every_s is not None:
            first = o.every_s if o.first_s is None else o.first_s
            k = max(0, int((t - first - o.for_s) // o.every_s))
            for i in range(k, k + 3):
                start = first + i * o.every_s
                if start + o.for_s > t:
                    out.append((start, start + o.for_s))
        return sorted(out)

    def next_window(self, t: float) -> tuple[float, float] | None:
        """The outage under way at ``t`` or else the next one, as (start, end), overlapping windows
        joined; None when no outage is ahead."""
        windows = self._candidates(t)
        if not windows:
            return None
        start, end = windows[0]
        while True:  # join windows that overlap or touch this one
            later = [w for w in self._candidates(end - 1e-9) if w[0] <= end and w[1] > end]
            if not later:
                return start, end
            end = max(w[1] for w in later)

    def down(self, t: float) -> bool:
        window = self.next_window(t)
        return window is not None and window[0] <= t


class Lane:
    """One direction of one link: :meth:`send` says when a chunk handed over at ``now`` arrives.

    Shared by every connection of the link (they share its bandwidth), so callers serialise calls.
    """

    def __init__(self, *, direction: Direction, rng: random.Random, now: float = 0.0) -> None:
        self.direction = direction
        self._rng = rng
        self._tokens = float(direction.burst_bytes)
        self._t_tokens = now  # when _tokens was computed
        self._last_arrival = now

    def send(self, n: int, now: float) -> float:
        """The time the chunk of ``n`` bytes handed over at ``now`` reaches the far end."""
        rate = self.direction.bytes_per_s
        leave = max(now, self._t_tokens)
        if rate is not None:
            tokens = min(float(self.direction.burst_bytes), self._tokens + (leave - self._t_tokens) * rate)
            if tokens < n:
                leave += (n - tokens) / rate
                tokens = float(n)
            self._tokens, self._t_tokens = tokens - n, leave
        jitter = self.direction.jitter_ms
        delay = max(0.0, self.direction.latency_ms + (self._rng.uniform(-jitter, jitter) if jitter else 0.0)) / 1000
        self._last_arrival = max(self._last_arrival, leave + delay)
        return self._last_arrival


class Cutter:
    """Where one connection's direction is cut, if it is: :meth:`cut_in` per chunk, in order."""

    def __init__(self, *, per_kb: float, at_byte: int | None, rng: random.Random) -> None:
        self.per_kb, self.at_byte, self._rng = per_kb, at_byte, rng
        self.carried = 0

    def cut_in(self, n: int) -> int | None:
        """The number of bytes of the next ``n``-byte chunk to deliver before the connection is cut,
        or None when the chunk goes whole."""
        before, self.carried = self.carried, self.carried + n
        if self.at_byte is not None and before < self.at_byte <= self.carried:
            return self.at_byte - before
        if self.per_kb and n and self._rng.random() < 1 - (1 - self.per_kb) ** (n / 1024):
            return self._rng.randrange(n)
        return None


def cutters(p: Profile, *, connection: int) -> dict[str, Cutter | None]:
    """The cutters of a link's ``connection``-th connection (0-based), per direction ("up", "down")."""
    c = p.cuts
    at = c.at_byte if connection < c.connections else None
    out: dict[str, Cutter | None] = {}
    for d in ("up", "down"):
        if c.direction in (d, "both") and (c.per_kb or at is not None):
            out[d] = Cutter(per_kb=c.per_kb, at_byte=at, rng=random.Random(f"{p.seed}/cut/{connection}/{d}"))
        else:
            out[d] = None
    return out


def lanes(p: Profile, *, now: float = 0.0) -> dict[str, Lane]:
    """A link's two lanes, their jitter seeded from the profile."""
    return {d: Lane(direction=getattr(p, d), rng=random.Random(f"{p.seed}/jitter/{d}"), now=now)
            for d in ("up", "down")}
