"""What the round policy keeps between events: its configuration, each counted update, the round.

Cost per event: a round may count ten thousand updates, so nothing the policy does for one event
may walk all of them. :class:`Accepted` is the accepted updates as an append-only sequence with an
index by site (lookup and append in O(1)); states derived from one another share it, and a state
keeps seeing exactly the updates it counted (its own length), so an older state is never changed by
a newer one. :meth:`RoundState.derive` builds the next state in O(1), checking only what changed;
building a state in full (``RoundState(...)``, ``from_dict``) checks everything, in O(n).

These are values, validated when built: a :class:`RoundState` that exists keeps the invariants
listed in :mod:`.rounds` that a single state can be checked for (one update per site, the accepted
sites enrolled while open, ``quorum_at`` set exactly at quorum, a closed round with a reason, a
time and at least one update). A state read back from ``state.json`` goes through the same checks,
so a damaged file is refused with the field it breaks rather than resumed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence, overload

from fednca.config import from_mapping
from fednca.errors import ConfigError
from fednca.rounds_vocab import CloseReason, RoundStatus

from .async_state import ASYNC, SYNC, EarlierRound, check_mode, earlier_from
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
    mode: str = SYNC  # "async": buffered asynchronous rounds (.async_rounds), K = buffer_size
    buffer_size: int = 3  # async: a new model after this many accepted updates
    max_staleness: int = 4  # async: updates trained this many model versions back are still taken

    def __post_init__(self) -> None:
        check_mode(self.mode, self.buffer_size, self.max_staleness)
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
        if self.mode == ASYNC:  # a buffer closes when full, or when every enrolled site is in it
            wanted = self.buffer_size
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
    staleness: int = 0  # async: model versions between the one it trained from and the round's

    def __post_init__(self) -> None:
        _integer("accepted.staleness", self.staleness, RoundStateError)
        for name in ("site", "update_id"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise RoundStateError(f"accepted.{name}", f"must be a non-empty string, got {getattr(self, name)!r}")
        _integer("accepted.samples", self.samples, RoundStateError)
        _integer("accepted.steps", self.steps, RoundStateError)
        if not isinstance(self.partial, bool):
            raise RoundStateError("accepted.partial", f"must be true or false, got {self.partial!r}")
        _finite("accepted.accepted_at", self.accepted_at, RoundStateError)


class Accepted(Sequence[AcceptedUpdate]):
    """The accepted updates of a round, in acceptance order, indexed by site.

    A view of the first ``n`` entries of a list that views derived from it may share: appending to
    the view that sees the whole list extends the list in place (O(1)) and returns a longer view;
    appending to an older, shorter view copies (O(n), which only a test replaying old states does).
    Equal to any sequence of the same entries (a tuple included).
    """

    __slots__ = ("_items", "_index", "_n")

    def __init__(self, entries: Iterable[AcceptedUpdate] = ()) -> None:
        self._items: list[AcceptedUpdate] = list(entries)
        self._index: dict[str, int] = {}
        for i, entry in enumerate(self._items):
            self._index.setdefault(entry.site, i)
        self._n = len(self._items)

    @property
    def unique(self) -> bool:
        """Whether no site has two entries (only a state read from a file can break this)."""
        return len(self._index) == self._n

    def by_site(self, site: str) -> AcceptedUpdate | None:
        i = self._index.get(site)
        return self._items[i] if i is not None and i < self._n else None

    def appended(self, entry: AcceptedUpdate) -> "Accepted":
        """This sequence with ``entry`` at the end, for a site not in it yet."""
        if self.by_site(entry.site) is not None:
            raise RoundStateError("accepted", f"site {entry.site!r} already has an accepted update")
        if self._n == len(self._items):
            out = Accepted.__new__(Accepted)
            out._items, out._index = self._items, self._index
        else:  # an older state growing a branch of its own
            out = Accepted(self._items[: self._n])
        out._items.append(entry)
        out._n = len(out._items)
        out._index[entry.site] = out._n - 1
        return out

    def without(self, site: str) -> "Accepted":
        """A new sequence without ``site``'s entry (O(n): a revocation)."""
        return Accepted(a for a in self if a.site != site)

    def extends(self, other: "Accepted") -> bool:
        """Whether this sequence is ``other`` with entries appended (or ``other`` itself)."""
        if self._items is other._items:
            return self._n >= other._n
        return len(self) >= len(other) and all(a == b for a, b in zip(self, other))

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> AcceptedUpdate: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[AcceptedUpdate, ...]: ...
    def __getitem__(self, i: int | slice) -> AcceptedUpdate | tuple[AcceptedUpdate, ...]:
        if isinstance(i, slice):
            return tuple(self._items[j] for j in range(self._n)[i])
        if not -self._n <= i < self._n:
            raise IndexError("accepted index out of range")
        return self._items[i % self._n]

    def __iter__(self) -> Iterator[AcceptedUpdate]:
        return itertools.islice(self._items, self._n)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Accepted):
            if self._items is other._items:
                return self._n == other._n
            return self._n == other._n and all(a == b for a, b in zip(self, other))
        if isinstance(other, (tuple, list)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Accepted({list(self)!r})"


@dataclass(frozen=True)
class RoundState:
    federation: str
    round: int
    model_sha256: str  # the global model this round trains from
    config: RoundConfig
    opened_at: float
    deadline: float
    enrolled: frozenset[str]
    accepted: Sequence[AcceptedUpdate] = ()  # kept as an Accepted (any sequence given is indexed)
    quorum_at: float | None = None  # when the K-th accepted update made quorum
    status: RoundStatus = RoundStatus.OPEN
    extensions: int = 0
    close_reason: CloseReason | None = None
    closed_at: float | None = None
    earlier: tuple[EarlierRound, ...] = ()  # async: the rounds before, newest first, within max_staleness

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
        if not isinstance(self.accepted, Accepted):
            object.__setattr__(self, "accepted", Accepted(self.accepted))
        if not self.accepted.unique:
            raise RoundStateError("accepted", "a site has more than one accepted update")
        sites = {a.site for a in self.accepted}
        if not closed and not sites <= self.enrolled:
            raise RoundStateError("accepted", f"sites not enrolled: {sorted(sites - self.enrolled)}")
        self._check_counts()

    def _check_counts(self) -> None:
        """The checks that do not walk the accepted updates (those :meth:`derive` repeats)."""
        closed, n = self.status == RoundStatus.CLOSED, len(self.accepted)
        if not closed and (self.quorum_at is not None) != (n >= self.quorum):
            raise RoundStateError("quorum_at", f"must be set exactly when {self.quorum} updates are accepted")
        if closed and not n:
            raise RoundStateError("accepted", "a round cannot close without an accepted update")

    def derive(self, **changes: Any) -> "RoundState":
        """This state with ``changes``, in O(1) when neither the enrolment nor the accepted set
        shrinks: an accepted sequence that extends this one by one entry is checked for that entry
        alone (enrolled while open), the counts and the close fields are checked as always. Any
        other change is checked in full."""
        accepted = changes.get("accepted", self.accepted)
        cheap = "enrolled" not in changes and isinstance(accepted, Accepted) and (
            accepted is self.accepted or (len(accepted) == len(self.accepted) + 1 and accepted.extends(self.accepted)))
        if not cheap:
            values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | changes
            return RoundState(**values)
        new = object.__new__(RoundState)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        closed = new.status == RoundStatus.CLOSED
        if closed != (new.close_reason is not None) or closed != (new.closed_at is not None):
            raise RoundStateError("close_reason", "a closed round, and only a closed one, has a close reason and time")
        if accepted is not self.accepted and not closed and accepted[-1].site not in new.enrolled:
            raise RoundStateError("accepted", f"sites not enrolled: {[accepted[-1].site]}")
        new._check_counts()
        return new

    @property
    def quorum(self) -> int:
        return self.config.quorum(len(self.enrolled))

    @property
    def all_reported(self) -> bool:
        if self.status == RoundStatus.OPEN:  # every accepted site is enrolled: counting is enough
            return bool(self.enrolled) and len(self.accepted) >= len(self.enrolled)
        return bool(self.enrolled) and all(self.accepted.by_site(site) is not None for site in self.enrolled)

    def accepted_from(self, site: str) -> AcceptedUpdate | None:
        return self.accepted.by_site(site)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["enrolled"] = sorted(self.enrolled)
        # Not dataclasses.asdict: it deep-copies every field, and this runs at every save of a
        # state that may count thousands of updates.
        names = [f.name for f in dataclasses.fields(AcceptedUpdate)]
        data["accepted"] = [{name: getattr(a, name) for name in names} for a in self.accepted]
        data["earlier"] = [e.to_dict() for e in self.earlier]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "RoundState":
        """The state ``to_dict`` wrote (after a JSON round trip); a bad field raises RoundStateError."""
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(data, dict) and "earlier" not in data:  # a file of the synchronous mode's first release
            data = {**data, "earlier": None}
        if not isinstance(data, dict) or set(data) != names:
            missing = sorted(names - set(data)) if isinstance(data, dict) else sorted(names)
            raise RoundStateError(missing[0] if missing else "fields", f"expected exactly the fields {sorted(names)}")
        try:
            values = dict(data)
            values["config"] = RoundConfig.from_dict(data["config"])
            values["enrolled"] = frozenset(_strings("enrolled", data["enrolled"]))
            values["accepted"] = Accepted(AcceptedUpdate(**a) for a in data["accepted"])
            values["earlier"] = earlier_from(data["earlier"])
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
