"""What the round log says about a federation at a glance: is it learning, is it done, who is out.

Pure: the log's records in, one :class:`History` out. ``fednca coordinator show`` and
``fednca status`` print it; neither reads the log's lines themselves.

- Learning: each accepted update carries its site's own measurements (``metrics``): the
  daemon reports ``dice_global``, the test Dice of the round's global model on the site's
  held-out images. Per round, the sites' values and their mean (the ``round_aggregated`` line's
  ``metrics_mean``, else the mean of what the accepted lines carry) say whether the federation
  learns: a rising mean Dice round after round.
- Done: a ``federation_finished`` line; the round then open in the state is only the final
  model's announcement, and no deadline applies.
- Out: a site whose last enrolment line is a ``site_revoked`` and that the registry no longer
  holds is revoked, whatever its last telemetry said.
- Errors: the latest ``update_rejected`` line per site (its reason and when), cleared by a later
  ``update_accepted`` of the same site.

Metrics names are a site's word, bounded and validated by the wire codec (lowercase letters,
digits, ``_``), and printed safely all the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from fednca.display import number, relative, safe

from .roundlog import (
    FederationFinishedRecord, LogRecord, RoundAggregatedRecord, SiteEnrolledRecord, SiteRevokedRecord,
    UpdateAcceptedRecord, UpdateRejectedRecord,
)  # fmt: skip

DICE = "dice_global"  # the metric that says whether the federation learns (see daemon/submission.py)
LOSS = "train_loss"


@dataclass(frozen=True)
class RoundSummary:
    round: int
    at: float | None = None  # when it was aggregated; None while open
    sites: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # site -> its metrics
    mean: Mapping[str, float] = field(default_factory=dict)

    def dice(self, site: str) -> float | None:
        return self.sites.get(site, {}).get(DICE)

    @property
    def dice_mean(self) -> float | None:
        return self.mean.get(DICE)

    def to_dict(self) -> dict:
        return {"round": self.round, "aggregated_at": self.at, "aggregated": self.at is not None,
                "sites": {s: dict(m) for s, m in self.sites.items()}, "mean": dict(self.mean)}


@dataclass(frozen=True)
class SiteError:
    site: str
    round: int
    reason: str
    at: float

    def to_dict(self) -> dict:
        return {"site": self.site, "round": self.round, "reason": self.reason, "at": self.at}


@dataclass(frozen=True)
class History:
    rounds: tuple[RoundSummary, ...]  # oldest first
    finished_at: float | None
    finished_round: int | None
    revoked: tuple[str, ...]
    errors: Mapping[str, SiteError]

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def latest(self, count: int) -> tuple[RoundSummary, ...]:
        return self.rounds[-count:] if count > 0 else ()


def _mean(values: Iterable[Mapping[str, float]]) -> dict[str, float]:
    reported = list(values)
    names = sorted({n for m in reported for n in m})
    return {n: round(sum(m[n] for m in reported if n in m) / sum(1 for m in reported if n in m), 4) for n in names}


def history(records: Iterable[LogRecord], *, enrolled: Iterable[str] = ()) -> History:
    """The federation's history from its round log; ``enrolled`` the sites the registry holds now."""
    per_round: dict[int, dict[str, Mapping[str, float]]] = {}
    aggregated: dict[int, RoundAggregatedRecord] = {}
    errors: dict[str, SiteError] = {}
    last_enrolment: dict[str, str] = {}
    finished: FederationFinishedRecord | None = None
    for r in records:
        if isinstance(r, UpdateAcceptedRecord):
            per_round.setdefault(r.round, {})[r.site] = dict(r.metrics)
            errors.pop(r.site, None)
        elif isinstance(r, RoundAggregatedRecord):
            aggregated[r.round] = r
            per_round.setdefault(r.round, {})
        elif isinstance(r, UpdateRejectedRecord):
            errors[r.site] = SiteError(site=r.site, round=r.update_round, reason=str(r.reason), at=r.at)
        elif isinstance(r, (SiteEnrolledRecord, SiteRevokedRecord)):
            last_enrolment[r.site] = r.kind
        elif isinstance(r, FederationFinishedRecord):
            finished = r
    now_enrolled = set(enrolled)
    revoked = tuple(sorted(s for s, kind in last_enrolment.items()
                           if kind == SiteRevokedRecord.KIND and s not in now_enrolled))  # fmt: skip
    rounds = []
    for number in sorted(per_round):
        sites = per_round[number]
        agg = aggregated.get(number)
        mean = dict(agg.metrics_mean) if agg is not None and agg.metrics_mean else _mean(sites.values())
        rounds.append(RoundSummary(round=number, at=None if agg is None else agg.at, sites=sites, mean=mean))
    return History(rounds=tuple(rounds), finished_at=None if finished is None else finished.at,
                   finished_round=None if finished is None else finished.round, revoked=revoked,
                   errors={s: e for s, e in errors.items() if s not in revoked})  # fmt: skip


def render_rounds(h: History, *, count: int = 5, now: float) -> list[str]:
    """The latest ``count`` rounds as table lines: the sites' reported test Dice and their mean
    (their training loss when no site evaluates on test images)."""
    shown = h.latest(count)
    if not shown:
        return ["no update accepted yet"]
    metric = DICE if any(DICE in m for r in shown for m in r.sites.values()) else LOSS
    sites = sorted({s for r in shown for s in r.sites})
    head = ["round", "mean " + ("Dice" if metric == DICE else "loss")] + [safe(s, 16) for s in sites] + ["aggregated"]
    table = [head]
    for r in shown:
        table.append([str(r.round), number(r.mean.get(metric), ".3f")]
                     + [number(r.sites[s].get(metric), ".3f") if s in r.sites else "-" for s in sites]
                     + [relative(r.at, now) if r.at is not None else "open"])  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    what = ("test Dice each site reported for the round's model" if metric == DICE
            else "training loss each site reported (no site reports a test Dice)")
    return [f"{what} (latest {len(shown)} rounds):"] + lines
