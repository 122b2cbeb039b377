"""What the round policy keeps between events: its configuration, each counted update, the round.

These are values, validated when built: a :class:`RoundState` that exists keeps the invariants
listed in :mod:`.rounds` that a single state can be checked for (one update per site, the accepted
sites enrolled while open, ``quorum_at`` set exactly at quorum, a closed round with a reason, a
time and at least one update). A state read back from ``state.json`` goes through the same checks,
so a damaged file is refused with the field it breaks rather than resumed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from fednca.config import from_mapping
from fednca.errors import ConfigError
from fednca.rounds_vocab import CloseReason, RoundStatus

from .errors import RoundStateError

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _finite(name: str, value: Any, error: Callable[[str, str], Exception], *, minimum: float = -math.inf) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value < math.inf:
        bound = "" if minimum == -math.inf else f" >= {minimum:g}"
        raise error(name, f"must be a finite number{bound}, got {value!r}")


def _integer(name: str, value: Any, error: Callable[[str, str], Exception], *, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise error(name, f"must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class RoundConfig:
    quorum_fraction: float = 0.6  # K = ceil(fraction * enrolled sites) ...
    quorum_count: int | None = None  # ... unless a fixed K is given (capped at the enrolled count)
    grace_s: float = 300.0  # close this long after the K-th accepted update
    round_s: float = 3600.0  # a new round's deadline is this long after it opens
    extension_s: float = 1800.0  # at the deadline with fewer than K updates, extend by this much

    def __post_init__(self) -> None:
        f = self.quorum_fraction
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise ConfigError("quorum_fraction", f"must be a number in (0, 1], got {f!r}")
        if self.quorum_count is not None:
            _integer("quorum_count", self.quorum_count, ConfigError, minimum=1)
        for name in ("grace_s", "round_s", "extension_s"):
            _finite(name, getattr(self, name), ConfigError, minimum=0)
        for name in ("round_s", "extension_s"):
            if getattr(self, name) == 0:
                raise ConfigError(name, "must be more than 0 seconds")

    def quorum(self, enrolled: int) -> int:
        """K for a federation of ``enrolled`` sites: at least 1, at most the enrolled count."""
        wanted = self.quorum_count or math.ceil(round(self.quorum_fraction * enrolled, 9))
        return max(1, min(wanted, enrolled))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "RoundConfig":
        return from_mapping(cls, data)


@dataclass(frozen=True)
class AcceptedUpdate:
    site: str
    update_id: str
    samples: int
    steps: int
    partial: bool
    accepted_at: float

    def __post_init__(self) -> None:
        for name in ("site", "update_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RoundStateError(f"accepted.{name}", f"must be a non-empty string, got {getattr(self, name)!r}")
        _integer("accepted.samples", self.samples, RoundStateError)
        _integer("accepted.steps", self.steps, RoundStateError)
        if not isinstance(self.partial, bool):
            raise RoundStateError("accepted.partial", f"must be true or false, got {self.partial!r}")
        _finite("accepted.accepted_at", self.accepted_at, RoundStateError)


@dataclass(frozen=True)
class RoundState:
    federation: str
    round: int
    model_sha256: str  # the global model this round trains from
    config: RoundConfig
    opened_at: float
    deadline: float
    enrolled: frozenset[str]
    accepted: tuple[AcceptedUpdate, ...] = ()
    quorum_at: float | None = None  # when the K-th accepted update made quorum
    status: RoundStatus = RoundStatus.OPEN
    extensions: int = 0
    close_reason: CloseReason | None = None
    closed_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str) or not self.federation:
            raise RoundStateError("federation", f"must be a non-empty string, got {self.federation!r}")
        _integer("round", self.round, RoundStateError)
        _integer("extensions", self.extensions, RoundStateError)
        if not isinstance(self.model_sha256, str) or not _SHA256.fullmatch(self.model_sha256):
            raise RoundStateError("model_sha256", "must be 64 lowercase hex digits")
        for name in ("opened_at", "deadline", "quorum_at", "closed_at"):
            if getattr(self, name) is not None or name in ("opened_at", "deadline"):
                _finite(name, getattr(self, name), RoundStateError)
        # The spellings of a state file become the shared enums (a member is its own spelling).
        object.__setattr__(self, "status", _member(RoundStatus, "status", self.status))
        if self.close_reason is not None:
            object.__setattr__(self, "close_reason", _member(CloseReason, "close_reason", self.close_reason))
        closed = self.status == RoundStatus.CLOSED
        if closed != (self.close_reason is not None) or closed != (self.closed_at is not None):
            raise RoundStateError("close_reason", "a closed round, and only a closed one, has a close reason and time")
        sites = [a.site for a in self.accepted]
        if len(set(sites)) != len(sites):
            raise RoundStateError("accepted", "a site has more than one accepted update")
        if not closed and not set(sites) <= self.enrolled:
            raise RoundStateError("accepted", f"sites not enrolled: {sorted(set(sites) - self.enrolled)}")
        if not closed and (self.quorum_at is not None) != (len(sites) >= self.quorum):
            raise RoundStateError("quorum_at", f"must be set exactly when {self.quorum} updates are accepted")
        if closed and not sites:
            raise RoundStateError("accepted", "a round cannot close without an accepted update")

    @property
    def quorum(self) -> int:
        return self.config.quorum(len(self.enrolled))

    @property
    def all_reported(self) -> bool:
        return bool(self.enrolled) and self.enrolled <= {a.site for a in self.accepted}

    def accepted_from(self, site: str) -> AcceptedUpdate | None:
        return next((a for a in self.accepted if a.site == site), None)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["enrolled"] = sorted(self.enrolled)
        # Not dataclasses.asdict: it deep-copies every field, and this runs at every save of a
        # state that may count thousands of updates.
        names = [f.name for f in dataclasses.fields(AcceptedUpdate)]
        data["accepted"] = [{name: getattr(a, name) for name in names} for a in self.accepted]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "RoundState":
        """The state ``to_dict`` wrote (after a JSON round trip); a bad field raises RoundStateError."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            missing = sorted(names - set(data)) if isinstance(data, dict) else sorted(names)
            raise RoundStateError(missing[0] if missing else "fields", f"expected exactly the fields {sorted(names)}")
        try:
            values = dict(data)
            values["config"] = RoundConfig.from_dict(data["config"])
            values["enrolled"] = frozenset(_strings("enrolled", data["enrolled"]))
            values["accepted"] = tuple(AcceptedUpdate(**a) for a in data["accepted"])
        except ConfigError as e:
            raise RoundStateError(f"config.{e.field}", e.why) from None
        except TypeError as e:  # an entry of "accepted" that is not a mapping of its fields
            raise RoundStateError("accepted", str(e)) from None
        return cls(**values)


def _member(kind: type, name: str, value: Any) -> Any:
    try:
        return kind(value)
    except ValueError:
        spelt = " or ".join(repr(m.value) for m in kind)
        raise RoundStateError(name, f"must be {spelt}, got {value!r}") from None


def _strings(name: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RoundStateError(name, "must be a list of strings")
    return value
