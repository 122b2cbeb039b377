"""What the coordinator tells this site: round announcements and receipts, verified and turned
into lifecycle events.

Both come signed by the coordinator; nothing unverified reaches the lifecycle. The newest verified
announcement is kept (in memory and as ``announcement.bin`` in the state folder, written before the
lifecycle hears of it) because the trainer child verifies and trains from that file and the update
is built against it. A refused announcement leaves the previous one in force and is reported in
the telemetry's ``error`` until a good one arrives; a refused receipt is only logged (the update
stays in the outbox and is published again).
"""

from __future__ import annotations

import logging
import time

from fednca.keys import CoordinatorPublicKeys
from fednca.wire import Announcement, WireError, open_announcement, open_receipt

from . import lifecycle as lc
from .outbox import StateFolder
from .submission import progress_of

log = logging.getLogger("fednca.daemon")


class CoordinatorInbox:
    """The verified view of the coordinator's messages for one site of one federation."""

    def __init__(self, *, federation: str, site: str, coordinator: CoordinatorPublicKeys,
                 folder: StateFolder) -> None:
        self.federation = federation
        self.site = site
        self.coordinator = coordinator
        self.folder = folder
        self.announcement: Announcement | None = None
        self._announcement_bytes: bytes | None = None
        self.error: str | None = None  # why the last announcement was refused, until a good one comes

    def resume(self) -> tuple[lc.RoundInfo | None, int, int | None]:
        """The saved round, if it still verifies, and the progress the checkpoint holds for it."""
        saved = self.folder.load_announcement()
        if saved is None:
            return None, 0, None
        try:
            ann = self._open(saved, min_round=None)
        except WireError as e:
            log.warning("the saved round announcement no longer verifies (%s); waiting for a new one", e)
            return None, 0, None
        self.announcement, self._announcement_bytes = ann, saved
        h = ann.header
        steps, planned = progress_of(self.folder.load_checkpoint(), round=h.round, base_sha256=h.model_sha256)
        return lc.RoundInfo(h.round, float(h.deadline), h.model_sha256), steps, planned

    def announcement_arrived(self, payload: bytes, *, state: lc.State) -> lc.Announced | None:
        """The event for a verified, saved announcement; None for the retained copy again, an
        empty (cleared) one, or one refused (older than what ``state`` follows, or not genuine)."""
        if not payload or payload == self._announcement_bytes:
            return None
        s = state
        min_round = s.round.round if s.round is not None else (s.done_round if s.done_round >= 0 else None)
        try:
            ann = self._open(payload, min_round=min_round)
        except WireError as e:
            self.error = f"round announcement refused: {e.reason}"
            log.warning("round announcement refused (%s): %s", e.reason, e)
            return None
        self.folder.save_announcement(payload)
        self.announcement, self._announcement_bytes = ann, payload
        self.error = None
        h = ann.header
        log.info("round %d announced (deadline %s, model %s)", h.round,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.deadline)), h.model_sha256[:12])
        return lc.Announced(h.round, float(h.deadline), h.model_sha256)

    def receipt_arrived(self, payload: bytes) -> lc.ReceiptArrived | None:
        """The event for a verified receipt addressed to this site; None for one refused."""
        try:
            r = open_receipt(payload, coordinator_verify_key=self.coordinator.verify,
                             federation=self.federation, topic_site=self.site)
        except WireError as e:
            log.warning("receipt refused (%s): %s", e.reason, e)
            return None
        if r.accepted:
            log.info("round %d: update %s accepted", r.round, r.update_id[:8])
        else:
            log.warning("round %d: update %s rejected: %s", r.round, r.update_id[:8], r.reason)
        return lc.ReceiptArrived(r.round, r.update_id, r.accepted, r.reason)

    def _open(self, payload: bytes, *, min_round: int | None) -> Announcement:
        return open_announcement(payload, coordinator_verify_key=self.coordinator.verify,
                                 federation=self.federation, min_round=min_round)
