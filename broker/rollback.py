"""Going back to an earlier global model: ``fednca coordinator rollback DIR --to-round N``.

A federation whose model went bad (poisoned before the checks that now guard it, or trained on a
site's broken data) recovers by continuing from a model it already had. The rollback opens a new
round, numbered after the current one so that every site sees a newer round and nothing already
sent can be mistaken for work on it, whose model is the stored model of round N. The round that
was open is abandoned: its updates were trained from the model being left behind, and a late one
is refused as ``stale_round``. The coordinator, started again, announces the new round signed
like any other.

The coordinator must be stopped (the store's lock says whether it runs). The steps are ordered
so that a rollback interrupted at any point can simply be run again: the model file first, then
the log line, and the round state last, which is what makes the rollback take effect.
"""

from __future__ import annotations

from dataclasses import dataclass

from fednca.rounds_vocab import RoundStatus
from fednca.wire import model_sha256

from .errors import StoreError
from .round_events import LogEvent
from .rounds import RoundConfig, open_round
from .roundlog import ModelRolledBackRecord
from .store import RoundStore


@dataclass(frozen=True)
class RolledBack:
    round: int  # the new round
    to_round: int  # whose model it trains from
    model_sha256: str
    abandoned: int  # accepted updates of the open round left behind


def roll_back(
    *, store: RoundStore, to_round: int, enrolled: frozenset[str], config: RoundConfig, now: float,
) -> RolledBack:  # fmt: skip
    """Open the round after the current one with the stored model of ``to_round``."""
    state = store.load_state()
    if state is None:
        raise StoreError(f"{store.folder}: no round has opened yet, there is nothing to roll back")
    stored = store.model_rounds()
    if to_round not in stored or to_round > state.round:
        known = ", ".join(str(r) for r in stored if r <= state.round) or "none"
        raise StoreError(f"--to-round {to_round}: no stored model of that round (stored: {known})")
    model = store.load_model(to_round)
    sha = model_sha256(model)
    new_round = state.round + 1
    store.save_model(new_round, model, metadata={"round": str(new_round), "rolled_back_to": str(to_round)})
    opened, actions = open_round(federation=store.federation, round=new_round, model_sha256=sha,
                                 enrolled=enrolled, config=config, now=now)  # fmt: skip
    abandoned = len(state.accepted) if state.status == RoundStatus.OPEN else 0
    store.append_logs([
        ModelRolledBackRecord(round=new_round, at=now, from_round=state.round, to_round=to_round,
                              model_sha256=sha, abandoned=abandoned),
        *(a.record for a in actions if isinstance(a, LogEvent)),
    ])  # fmt: skip
    store.save_state(opened)
    return RolledBack(round=new_round, to_round=to_round, model_sha256=sha, abandoned=abandoned)
