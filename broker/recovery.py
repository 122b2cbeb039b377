"""What a restarted coordinator learns from its round log: the state it resumes, and the lines
it must write again.

:func:`replay` is the second half of reading a round state: ``state.json`` is a snapshot written
at transitions only, and the acceptances of the open round since then are the ``update_accepted``
lines after it in the log (each batch appends them, in one fsync, before any of its messages is
acknowledged). Replaying them gives back the state that counted them.

The rest of this page is about the lines themselves.

The coordinator saves the round state before it acknowledges, publishes or logs anything for a
batch of messages, and appends the batch's round-log lines last (one write, one fsync). A crash
between the state save and that append leaves a state that counts updates, or a closed round, the
log does not name yet; the broker has already forgotten those messages, so nothing would ever
log them. A crash in the middle of closing a round likewise can leave the new model saved but the
``round_aggregated`` line unwritten, or the other way round.

:class:`RoundLogIndex` reads the log once at start-up and answers both questions: which
(kind, round) lines are already there, so a repeated step (aggregating a round, finishing the
federation) does not log twice; and which lines the saved state implies but the log lacks
(:meth:`RoundLogIndex.missing`), written back marked ``recovered``. It is pure: the coordinator
reads the log and performs the writes.
"""

from __future__ import annotations

from typing import Iterable

from fednca.rounds_vocab import RoundStatus

from .round_state import AcceptedUpdate, RoundState
from .roundlog import LogRecord, RoundClosedRecord, UpdateAcceptedRecord


def replay(state: RoundState, records: Iterable[LogRecord]) -> RoundState:
    """``state`` (a snapshot of an open round) with the acceptances ``records`` hold for its round,
    in log order, each site once, ``quorum_at`` set by the acceptance that made quorum, as the
    policy set it. A line for a site already counted or not enrolled in the snapshot is left out:
    it is one the snapshot already covers, or of an update a later revocation dropped."""
    for r in records:
        if not isinstance(r, UpdateAcceptedRecord) or r.round != state.round or state.status != RoundStatus.OPEN:
            continue
        if r.site not in state.enrolled or state.accepted_from(r.site) is not None:
            continue
        entry = AcceptedUpdate(r.site, r.update_id, r.samples, r.steps, r.partial, r.at, r.staleness)
        accepted = state.accepted.appended(entry)  # type: ignore[attr-defined]
        reached = state.quorum_at is None and len(accepted) >= state.quorum
        state = state.derive(accepted=accepted, quorum_at=r.at if reached else state.quorum_at)
    return state


class RoundLogIndex:
    """The (kind, round) pairs of a round log, and the accepted updates each round's lines name."""

    def __init__(self, records: Iterable[LogRecord] = ()) -> None:
        self._records = list(records)
        self._seen: set[tuple[str, int | None]] = {(r.kind, getattr(r, "round", None)) for r in self._records}

    def has(self, kind: str, round: int) -> bool:
        """Whether the log held a ``kind`` line for ``round`` when it was read."""
        return (kind, round) in self._seen

    def missing(self, state: RoundState) -> list[LogRecord]:
        """The lines ``state`` implies and the log lacks, in the order they would have been written:
        each counted update's acceptance, then the close of a closed round."""
        logged = {(r.site, r.update_id) for r in self._records
                  if isinstance(r, UpdateAcceptedRecord) and r.round == state.round}  # fmt: skip
        out: list[LogRecord] = [
            UpdateAcceptedRecord(
                round=state.round, at=a.accepted_at, site=a.site, update_id=a.update_id, samples=a.samples,
                steps=a.steps, partial=a.partial, recovered=True, staleness=a.staleness,
            )
            for a in state.accepted
            if (a.site, a.update_id) not in logged
        ]  # fmt: skip
        if state.status == RoundStatus.CLOSED and not self.has(RoundClosedRecord.KIND, state.round):
            assert state.closed_at is not None and state.close_reason is not None  # a closed state has both
            out.append(RoundClosedRecord(
                round=state.round, at=state.closed_at, reason=state.close_reason,
                sites=tuple(a.site for a in state.accepted), samples=sum(a.samples for a in state.accepted),
                extensions=state.extensions, recovered=True,
            ))  # fmt: skip
        return out
