"""The last status message of each enrolled site, as the coordinator heard it.

Sites publish small JSON telemetry on ``status/<site>`` (retained, with an ``offline`` last will).
The coordinator keeps only the latest object per site, in memory, for the operator's views; it
never decides anything from it. A message from a site that is not enrolled, longer than
:data:`STATUS_MAX_BYTES`, or not a JSON object is ignored: telemetry is unauthenticated, and one
site must not be able to fill the coordinator's memory or overwrite another's entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fednca.tensorcodec import loads_strict

log = logging.getLogger("fednca.coordinator")

STATUS_MAX_BYTES = 4096


@dataclass(frozen=True)
class SiteStatus:
    received_at: float  # clock reading when it arrived
    telemetry: Mapping[str, Any]  # the site's JSON object as sent


class StatusCache:
    """The latest :class:`SiteStatus` per enrolled site."""

    def __init__(self, *, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._statuses: dict[str, SiteStatus] = {}

    def take(self, *, site: str, payload: bytes, enrolled: bool) -> bool:
        """Keep ``payload`` as ``site``'s latest status if it is acceptable; say whether it was."""
        telemetry = None
        if enrolled and len(payload) <= STATUS_MAX_BYTES:
            try:
                telemetry = loads_strict(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                telemetry = None
        if not isinstance(telemetry, dict):
            log.debug("status of %r ignored: not a JSON object of at most %d bytes from an enrolled site",
                      site, STATUS_MAX_BYTES)  # fmt: skip
            return False
        self._statuses[site] = SiteStatus(self._clock(), telemetry)
        return True

    def forget(self, site: str) -> None:
        """A revoked site's last status goes with it."""
        self._statuses.pop(site, None)

    def snapshot(self) -> dict[str, SiteStatus]:
        return dict(self._statuses)
