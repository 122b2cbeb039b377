"""A small round log written by hand: two rounds aggregated with the sites' reported Dice, a
revoked site, a rejected update whose reason is the site's latest error, and (optionally) the
federation's end. Shared by the show and status tests."""

from __future__ import annotations

from fednca.rounds_vocab import CloseReason, Reason
from fednca_broker.rounds import RoundConfig, open_round
from fednca_broker.roundlog import (
    FederationFinishedRecord, RoundAggregatedRecord, SiteRevokedRecord, UpdateAcceptedRecord, UpdateRejectedRecord,
)  # fmt: skip
from fednca_broker.store import RoundStore

SHA = "ab" * 32


def accepted(rnd: int, site: str, dice: float, at: float) -> UpdateAcceptedRecord:
    return UpdateAcceptedRecord(at=at, round=rnd, site=site, update_id=f"{site}{rnd}", samples=4, steps=8,
                                partial=False, metrics={"dice_global": dice})  # fmt: skip


def aggregated(rnd: int, at: float, mean: float) -> RoundAggregatedRecord:
    return RoundAggregatedRecord(at=at, round=rnd, reason=CloseReason.ALL_REPORTED, sites=("site-a", "site-b"),
                                 samples=8, method="fedavg", clip_norm=None, model_sha256=SHA, model_bytes=100,
                                 seconds=0.1, metrics_mean={"dice_global": mean})  # fmt: skip


def write_history(store: RoundStore, *, now: float, finished: bool, enrolled=("site-a",)) -> None:
    """Rounds 1 and 2 aggregated, site-b revoked after round 2, round 3 open (or the end)."""
    t = now - 600
    store.append_logs([
        accepted(1, "site-a", 0.31, t), accepted(1, "site-b", 0.29, t + 1), aggregated(1, t + 2, 0.30),
        accepted(2, "site-a", 0.52, t + 10), accepted(2, "site-b", 0.48, t + 11), aggregated(2, t + 12, 0.50),
        UpdateRejectedRecord(at=t + 20, round=3, site="site-a", update_id="x", update_round=2,
                             reason=Reason.STALE_ROUND),
        SiteRevokedRecord(at=t + 30, round=3, site="site-b"),
    ])  # fmt: skip
    if finished:
        store.append_log(FederationFinishedRecord(at=now - 60, round=2, model_sha256=SHA))
    state, _ = open_round(federation=store.federation, round=3, model_sha256=SHA, enrolled=frozenset(enrolled),
                          config=RoundConfig(quorum_count=1), now=now - 60)  # fmt: skip
    store.save_state(state)
