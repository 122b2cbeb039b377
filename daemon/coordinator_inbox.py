"""What the coordinator tells this site: round announcements and receipts, verified and turned
into lifecycle events.

Both come signed by the coordinator; nothing unverified reaches the lifecycle. The newest verified
announcement is kept (in memory and as ``announcement.bin`` in the state folder, written before the
lifecycle hears of it) because the trainer child verifies and trains from that file and the update
is built against it. A refused announcement leaves the previous one in force and is reported in
the telemetry's ``error`` until a good one arrives; a refused receipt is only logged (the update
stays in the outbox and is published again).

Time. A site never compares its own wall clock with the coordinator's deadline: a clinic's device
may be hours off. The announcement says how many seconds the round had left when it was published
(``seconds_left``); the daemon's deadline is its own clock at receipt plus that, kept in
``announcement.json`` so a restart keeps it (:func:`local_deadline`). The difference between this
device's wall clock and the coordinator's publication time, measured on announcements received
live (not a retained copy, which may be old), is the site's clock offset, shown in its telemetry.
An announcement without ``seconds_left`` (an older coordinator) falls back to the deadline read
against this device's wall clock, with a warning. If the announcement cannot be stored (a full
disk), it is held and stored again later (:meth:`CoordinatorInbox.store_held`); the lifecycle
hears of it only once it is stored, with the deadline measured at receipt.

Deltas. A round may be announced as a delta from the previous global model (docs/wire.md). It is
rebuilt from the model this site holds (in memory, and ``model.safetensors``, written before the
announcement: :mod:`.held_model`) and must give the signed sha256. A site that holds neither the
base nor the new model (it missed rounds, or lost its files), or whose base plus the delta does
not give the signed sha256 (a damaged held model, float32 arithmetic that differs), is refused
with ``wrong_base_model`` and sets :attr:`CoordinatorInbox.need_model`: the service subscribes to the retained ``model``
topic, whose whole-model announcement then arrives by :meth:`CoordinatorInbox.model_arrived` and
is taken like any announcement, and unsubscribes once the site holds the model again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fednca.keys import CoordinatorPublicKeys
from fednca.wire import Announcement, AnnouncementHeader, Reason, WireError, open_announcement, open_receipt

from . import lifecycle as lc
from .errors import DamagedFile
from .held_model import held_models, save_held
from .outbox import StateFolder, Timing
from .submission import checkpoint_damage, progress_of

log = logging.getLogger("fednca.daemon")


def local_deadline(h: AnnouncementHeader, *, now: float, wall: float) -> float:
    """The round's deadline on the daemon's clock (``now``), for an announcement received at
    ``now`` (``wall`` by this device's wall clock): ``now + seconds_left``; without that field
    (an older coordinator), the deadline read against the wall clock."""
    if h.seconds_left is not None:
        return now + h.seconds_left
    return now + (h.deadline - wall)


@dataclass(frozen=True)
class _Held:
    """A verified announcement not yet stored (the disk refused it)."""

    announcement: Announcement
    payload: bytes
    deadline: float


class CoordinatorInbox:
    """The verified view of the coordinator's messages for one site of one federation."""

    def __init__(self, *, federation: str, site: str, coordinator: CoordinatorPublicKeys,
                 folder: StateFolder) -> None:
        self.federation = federation
        self.site = site
        self.coordinator = coordinator
        self.folder = folder
        self.announcement: Announcement | None = None
        # The one before it: in buffered rounds the work a newer model interrupts is submitted against it.
        self.previous: Announcement | None = None
        self._announcement_bytes: bytes | None = None
        self.error: str | None = None  # why the last announcement was refused, until a good one comes
        self.clock_offset_s: float | None = None  # this device's wall clock minus the coordinator's
        self._held: _Held | None = None
        self._warned_old = False
        self.need_model = False  # a delta came whose base this site does not hold: fetch the whole model
        self._round_bytes: bytes | None = None  # the last payload taken from the round topic

    @property
    def holding(self) -> bool:
        """True while a verified announcement waits to be stored."""
        return self._held is not None

    def resume(self, *, now: float, wall: float) -> tuple[lc.RoundInfo | None, int, int | None]:
        """The saved round, if it still verifies, and the progress the checkpoint holds for it.
        A file found damaged is moved aside (and said so); a read error raises StateFolderError."""
        blob = self._checkpoint()
        saved = self.folder.load_announcement()
        if saved is None:
            return None, 0, None
        try:
            ann = self._open(saved, min_round=None)
        except WireError as e:
            aside = self.folder.move_aside(self.folder.announcement_path)
            log.error("the saved round announcement does not verify (%s): moved to %s; waiting for the "
                      "coordinator's (retained) announcement", e.reason, aside)
            return None, 0, None
        self.announcement, self._announcement_bytes = ann, saved
        h = ann.header
        deadline = self._saved_deadline(h, now=now, wall=wall)
        steps, planned = progress_of(blob, round=h.round, base_sha256=h.model_sha256)
        return lc.RoundInfo(h.round, deadline, h.model_sha256, h.max_staleness or 0), steps, planned

    def _checkpoint(self) -> bytes | None:
        """The trainer's checkpoint; one found damaged is moved aside (the round starts again
        from the global model) rather than handed to a trainer or submitted."""
        blob = self.folder.load_checkpoint()
        if blob is not None and (why := checkpoint_damage(blob)) is not None:
            aside = self.folder.move_aside(self.folder.checkpoint_path)
            log.error("the trainer's checkpoint is damaged (%s): moved to %s; the round starts again from the "
                      "global model", why, aside)
            return None
        return blob

    def _saved_deadline(self, h: AnnouncementHeader, *, now: float, wall: float) -> float:
        try:
            t = self.folder.load_timing()
        except DamagedFile as e:
            aside = self.folder.move_aside(e.path)  # type: ignore[arg-type]
            log.warning("%s: moved to %s; the round's time is counted again from now", e, aside)
            t = None
        if t is not None and t.round == h.round and t.model_sha256 == h.model_sha256:
            return t.deadline
        # No timing saved with it: treat it as received now (see docs/wire.md: at worst late, and told so).
        return local_deadline(h, now=now, wall=wall)

    def announcement_arrived(self, payload: bytes, *, state: lc.State, now: float, wall: float,
                             live: bool) -> lc.Announced | None:
        """The event for a verified, stored announcement; None for the retained copy again, an
        empty (cleared) one, or one refused (older than what ``state`` follows, or not genuine).
        ``live``: forwarded as it was published, not a retained copy. Raises OSError when it
        cannot be stored; it is then held for :meth:`store_held`."""
        if not payload or payload == self._announcement_bytes or payload == self._round_bytes:
            return None
        self._round_bytes = payload
        return self._take(payload, state=state, now=now, wall=wall, live=live)

    def model_arrived(self, payload: bytes, *, state: lc.State, now: float, wall: float,
                      live: bool) -> lc.Announced | None:
        """The whole model from the ``model`` topic, taken as an announcement while
        :attr:`need_model` (ignored otherwise); None as for :meth:`announcement_arrived`."""
        if not self.need_model or not payload or payload == self._announcement_bytes:
            return None
        return self._take(payload, state=state, now=now, wall=wall, live=live)

    def _take(self, payload: bytes, *, state: lc.State, now: float, wall: float, live: bool) -> lc.Announced | None:
        s = state
        min_round = s.round.round if s.round is not None else (s.done_round if s.done_round >= 0 else None)
        try:
            ann = self._open(payload, min_round=min_round)
        except WireError as e:
            if e.reason == Reason.WRONG_BASE_MODEL:
                if not self.need_model:
                    log.info("round announced as a delta this site cannot rebuild (%s): fetching the whole "
                             "model", e)
                self.need_model = True
                self.error = "waiting for the whole global model (missed rounds)"
                return None
            self.error = f"round announcement refused: {e.reason}"
            log.warning("round announcement refused (%s): %s", e.reason, e)
            return None
        self.need_model = False
        h = ann.header
        self.error = None
        if h.published is not None and live:
            self.clock_offset_s = wall - h.published
        if h.seconds_left is None and not self._warned_old:
            self._warned_old = True
            log.warning("the round announcement carries no seconds_left (a coordinator older than this "
                        "daemon): its deadline is read against this device's clock, which must then be right")
        self._held = _Held(ann, payload, local_deadline(h, now=now, wall=wall))
        return self.store_held()

    def store_held(self) -> lc.Announced | None:
        """Store the held announcement and return its event; raises OSError (and keeps holding
        it) when the disk refuses."""
        held = self._held
        if held is None:
            return None
        h = held.announcement.header
        save_held(self.folder, held.announcement.tensors)  # first: the announcement may be a delta from it
        self.folder.save_announcement(held.payload)
        self.folder.save_timing(Timing(round=h.round, model_sha256=h.model_sha256, deadline=held.deadline))
        self._held = None
        if self.announcement is None or self.announcement.header.round != h.round:
            self.previous = self.announcement  # a re-announcement (deadline moved) keeps the round before
        self.announcement, self._announcement_bytes = held.announcement, held.payload
        log.info("round %d announced (deadline %s by the coordinator's clock, model %s)", h.round,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.deadline)), h.model_sha256[:12])
        return lc.Announced(h.round, held.deadline, h.model_sha256, h.max_staleness or 0)

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
        current = None if self.announcement is None else self.announcement.tensors
        return open_announcement(payload, coordinator_verify_key=self.coordinator.verify,
                                 federation=self.federation, min_round=min_round,
                                 held=held_models(self.folder, current))
