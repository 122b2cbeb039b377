"""How much a stale update counts in a buffered asynchronous round, and the rows that carry it.

FedBuff (Nguyen et al., AISTATS 2022) scales each client's delta by ``s(τ) = 1 / sqrt(1 + τ)``,
``τ`` the number of model versions published between the one the client trained from and the one
the server applies the buffer to. We use the same rule, for these reasons:

* it is the paper's, so our figures can be set beside its figures;
* it is gentle. A delta one version old keeps 71 % of its size, four versions old 45 %: on a
  clinic's 2G link the slow sites are the ones whose images the fast ones lack, so they must still
  move the model; ``1/(1+τ)`` would keep 20 % at four versions, a hinge rule nothing past its cut;
* it never reaches zero inside ``max_staleness``, and past it the policy refuses the update with a
  reason the site sees (``too_stale``) instead of counting it for almost nothing;
* scaling the delta itself, not the sample weight, works under every aggregation rule the
  coordinator offers: the trimmed mean and the median ignore sample weights, and under FedAvg a
  smaller weight would only shift the mean toward the fresh deltas without shrinking the step.
  The norm bounds then see the scaled delta, as FedBuff's clipping sees what it sums.

Pure: :class:`StaleRows` only multiplies the rows another :class:`fednca.aggregate_rows.Rows`
reads, as they are read.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from fednca.aggregate_rows import Rows


def staleness_weight(staleness: int) -> float:
    """The factor a delta trained ``staleness`` model versions ago is scaled by: 1 / sqrt(1 + s)."""
    if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
        raise ValueError(f"staleness must be an integer >= 0, got {staleness!r}")
    return 1.0 / math.sqrt(1.0 + staleness)


class StaleRows:
    """``rows`` with row ``i`` multiplied by ``factors[i]`` (float64 product, stored as float32)."""

    def __init__(self, rows: Rows, factors: Sequence[float]) -> None:
        if len(factors) != rows.n:
            raise ValueError(f"{len(factors)} factors for {rows.n} rows")
        self._rows = rows
        self._factors = np.asarray(factors, dtype=np.float64)
        self.n = rows.n
        self.size = rows.size

    def row(self, i: int) -> np.ndarray:
        return (self._rows.row(i).astype(np.float64) * self._factors[i]).astype(np.float32)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for start, block in self._rows.blocks():
            yield start, (block.astype(np.float64) * self._factors[:, None]).astype(np.float32)


def stale_inputs(rows: Rows, norms: Sequence[float], staleness: Sequence[int]) -> tuple[Rows, list[float]]:
    """The rows and norms the aggregation sees for updates of these stalenesses: unchanged when all
    are fresh (the synchronous mode, to the bit), else scaled by :func:`staleness_weight`."""
    if not any(staleness):
        return rows, list(norms)
    factors = [staleness_weight(s) for s in staleness]
    return StaleRows(rows, factors), [n * f for n, f in zip(norms, factors)]
