"""What the buffered asynchronous mode adds to a round's configuration and state.

In the asynchronous mode (:mod:`.async_rounds`) a round is one version of the global model, and it
closes as soon as ``buffer_size`` updates are counted. An update trained from an earlier version is
still taken while it is at most ``max_staleness`` versions behind. To judge it the policy needs,
for each of those earlier versions, the model it trained from (an update must name it as its base)
and the updates that version counted (a re-delivery of one of them is acknowledged again, never
counted twice). :class:`EarlierRound` is that record; a :class:`.round_state.RoundState` keeps one
per earlier version still within reach, newest first, so the state stays bounded by
``max_staleness`` × the buffer, whatever the number of sites or rounds.

The checks of the three configuration keys live here too, so the round configuration names them in
one line; a synchronous federation never reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fednca.errors import ConfigError

from .errors import RoundStateError

SYNC, ASYNC = "sync", "async"
MODES = (SYNC, ASYNC)
MAX_STALENESS_LIMIT = 1000  # the state keeps one record per version within reach: bound it
_SHA256 = re.compile(r"[0-9a-f]{64}")


def update_key(site: str, update_id: str) -> str:
    """How an earlier round names one of its counted updates (site ids carry no ``/``)."""
    return f"{site}/{update_id}"


@dataclass(frozen=True)
class EarlierRound:
    """A closed round whose model stale updates may still have trained from: its model's sha256,
    and the updates it counted (``site/update_id``), in acceptance order."""

    model_sha256: str
    updates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model_sha256, str) or not _SHA256.fullmatch(self.model_sha256):
            raise RoundStateError("earlier.model_sha256", "must be 64 lowercase hex digits")
        if isinstance(self.updates, list):
            object.__setattr__(self, "updates", tuple(self.updates))
        if not isinstance(self.updates, tuple) or not all(isinstance(u, str) and "/" in u for u in self.updates):
            raise RoundStateError("earlier.updates", "must be a list of 'site/update_id' strings")

    def counted(self, site: str, update_id: str) -> bool:
        return update_key(site, update_id) in self.updates

    def to_dict(self) -> dict[str, Any]:
        return {"model_sha256": self.model_sha256, "updates": list(self.updates)}


def earlier_from(data: Any) -> tuple[EarlierRound, ...]:
    """The ``earlier`` field of a state file (absent in files of the synchronous mode's first
    release: then none)."""
    if data is None:
        return ()
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise RoundStateError("earlier", "must be a list of {model_sha256, updates} objects")
    try:
        return tuple(EarlierRound(**d) for d in data)
    except TypeError as e:
        raise RoundStateError("earlier", str(e)) from None


def check_mode(mode: Any, buffer_size: Any, max_staleness: Any) -> None:
    """Raise ConfigError naming the first of the three keys that is wrong."""
    if mode not in MODES:
        raise ConfigError("mode", f"must be {SYNC!r} or {ASYNC!r}, got {mode!r}")
    if not isinstance(buffer_size, int) or isinstance(buffer_size, bool) or buffer_size < 1:
        raise ConfigError("buffer_size", f"must be an integer >= 1, got {buffer_size!r}")
    if (not isinstance(max_staleness, int) or isinstance(max_staleness, bool)
            or not 0 <= max_staleness <= MAX_STALENESS_LIMIT):  # fmt: skip
        raise ConfigError("max_staleness", f"must be an integer from 0 to {MAX_STALENESS_LIMIT}, got {max_staleness!r}")
