"""Aggregation over a round's deltas held as rows of a matrix, in bounded memory.

:func:`fednca.aggregate.aggregate` takes the deltas as dicts and, for the robust rules, stacks
every one of them in float64: ten thousand updates of the 7,262-parameter model are 580 MB. Here
the same rules run over a :class:`Rows` source: update ``i`` is row ``i`` (float32, the tensors of
``layout`` one after another), read one row or one block of columns at a time, so the memory is
one block of columns for all updates (``n x width`` float32) whatever is stored where. The
coordinator keeps each verified delta as such a row when it arrives, so that closing a round
neither opens an update again nor holds all of them in memory.

The result equals :func:`fednca.aggregate.aggregate` on the same deltas to the last bit (the tests
compare the two): every step is the same arithmetic on the same values, element by element.

* Norm bounds (``clip_norm``, then ``median_norm_factor``) become one or two scale factors per row,
  found by reading only the rows that exceed a bound; a block of columns applies them as
  :func:`fednca.aggregate.scaled` would.
* FedAvg sums ``row * weight`` in float64 in row order, block by block: a true streaming sum, the
  only rule that could be fed row by row without keeping the rows (see docs/rounds.md).
* Median and trimmed mean sort each column. The values are float32, so sorting them in float32
  orders them as float64 would, at half the memory and time; the mean or the middle pair is
  taken in float64, as before.

Pure: no I/O here; a :class:`Rows` reads whatever the caller keeps (the coordinator's spool).
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import numpy as np

from .aggregate import AggregationConfig, AggregationError, clip_scale, global_norm, lower_median, trim_count

Layout = Sequence[tuple[str, tuple[int, ...]]]  # tensor names and shapes, in row order
SORT_WIDTH = 128  # columns combined at once: the working copies are n x 128 values


class Rows(Protocol):
    """``n`` rows of ``size`` float32 values, in the order the updates were accepted."""

    n: int
    size: int

    def row(self, i: int) -> np.ndarray:
        """Row ``i`` (float32, ``size`` values)."""

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first column, ``n x width`` float32 block) covering the columns in order."""


def layout_of(shapes: "dict[str, tuple[int, ...]] | object") -> list[tuple[str, tuple[int, ...]]]:
    """The row layout of a model's tensor shapes: sorted by name, so that every process (a
    coordinator's workers, its aggregator) lays a delta out alike whatever order it read them in."""
    return sorted((name, tuple(shape)) for name, shape in shapes.items())  # type: ignore[attr-defined]


def flatten(delta: dict[str, np.ndarray] | object, layout: Layout) -> np.ndarray:
    """A delta's tensors, in ``layout`` order, as one float32 row."""
    return np.concatenate([np.asarray(delta[name], dtype=np.float32).reshape(-1) for name, _ in layout])  # type: ignore[index]


def unflatten(row: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = row[at : at + size].reshape(shape)
        at += size
    return out


def row_norm(row: np.ndarray, layout: Layout) -> float:
    """:func:`fednca.aggregate.global_norm` of the delta ``row`` holds, to the bit: the squares in
    float64, summed tensor by tensor (numpy's pairwise sum over each tensor's contiguous values),
    the tensors' sums added in order; one conversion of the row instead of one per tensor."""
    squares = np.square(np.asarray(row, dtype=np.float64))
    total, at = 0.0, 0
    for _, shape in layout:
        size = math.prod(shape)
        total += float(np.sum(squares[at : at + size]))
        at += size
    return math.sqrt(total)


def aggregate_rows(
    rows: Rows, *, weights: Sequence[float], norms: Sequence[float], layout: Layout, cfg: AggregationConfig,
) -> dict[str, np.ndarray]:  # fmt: skip
    """:func:`fednca.aggregate.aggregate` of the deltas ``rows`` holds, with their sample counts
    ``weights`` and their global norms ``norms`` (:func:`row_norm`, computed when they arrived)."""
    n = rows.n
    if n == 0:
        raise AggregationError("no updates to aggregate")
    if len(weights) != n or len(norms) != n or rows.size != sum(math.prod(s) for _, s in layout):
        raise AggregationError("rows, weights, norms and layout do not agree")
    for i, w in enumerate(weights):
        if not isinstance(w, (int, float, np.integer, np.floating)) or isinstance(w, bool) or not 0 <= w < math.inf:
            raise AggregationError(f"update {i}: weight must be finite and >= 0, got {w!r}")
    scales: dict[int, list[float]] = {}  # row -> the factors applied to it, in order
    current = [float(x) for x in norms]
    if cfg.clip_norm is not None:
        _bound(rows, layout, scales, current, [cfg.clip_norm] * n)
    if cfg.median_norm_factor is not None:
        bound = cfg.median_norm_factor * lower_median(current)
        if bound > 0:
            _bound(rows, layout, scales, current, [bound] * n)
    weight = [float(w) for w in weights]
    if cfg.max_weight_ratio is not None and cfg.method == "fedavg":
        cap = cfg.max_weight_ratio * lower_median(weight)
        weight = [min(w, cap) for w in weight]
    combine = {"fedavg": _fedavg, "median": _median, "trimmed_mean": _trimmed}[cfg.method]
    out = np.empty(rows.size, dtype=np.float32)
    for start, block in rows.blocks():
        block = _scaled_block(block, scales)
        for j in range(0, block.shape[1], SORT_WIDTH):  # a sort's copies stay small (n x 128)
            part = block[:, j : j + SORT_WIDTH]
            out[start + j : start + j + part.shape[1]] = combine(part, weight, cfg)
    if cfg.method == "fedavg" and not sum(weight) > 0:
        raise AggregationError("the sample counts add up to 0: nothing to weight by")
    return {name: np.array(value) for name, value in unflatten(out, layout).items()}


def _bound(rows: Rows, layout: Layout, scales: dict[int, list[float]], current: list[float],
           bounds: list[float]) -> None:  # fmt: skip
    """Record the factor :func:`fednca.aggregate.clip_norm` would scale each row over its bound by."""
    for i, (norm, bound) in enumerate(zip(current, bounds)):
        if norm <= bound:
            continue
        row = rows.row(i)
        for factor in scales.get(i, []):
            row = (row.astype(np.float64) * factor).astype(np.float32)
        factor, clipped = clip_scale(unflatten(row, layout), bound, norm=norm)
        assert clipped is not None  # norm > bound: it was scaled
        scales.setdefault(i, []).append(factor)
        current[i] = global_norm(clipped)


def _scaled_block(block: np.ndarray, scales: dict[int, list[float]]) -> np.ndarray:
    if not scales:
        return block
    block = np.array(block, dtype=np.float32)
    for i, factors in scales.items():
        for factor in factors:
            block[i] = (block[i].astype(np.float64) * factor).astype(np.float32)
    return block


def _fedavg(block: np.ndarray, weight: list[float], cfg: AggregationConfig) -> np.ndarray:
    w = np.asarray(weight, dtype=np.float64)
    acc = np.add.reduce(block.astype(np.float64) * w[:, None], axis=0)  # row by row, in row order
    total = 0.0
    for x in weight:  # the weight sum, added as fedavg adds it
        total += x
    if total <= 0:
        return np.zeros(block.shape[1], dtype=np.float32)  # refused by the caller
    return (acc / total).astype(np.float32)


def _median(block: np.ndarray, weight: list[float], cfg: AggregationConfig) -> np.ndarray:
    ordered, n = np.sort(block, axis=0), block.shape[0]
    if n % 2:
        return ordered[n // 2].astype(np.float64).astype(np.float32)
    pair = ordered[n // 2 - 1 : n // 2 + 1].astype(np.float64)
    return np.mean(pair, axis=0).astype(np.float32)


def _trimmed(block: np.ndarray, weight: list[float], cfg: AggregationConfig) -> np.ndarray:
    n = block.shape[0]
    cut = trim_count(n, trim=cfg.trim, min_trim=cfg.min_trim)
    ordered = np.sort(block, axis=0)
    return ordered[cut : n - cut].astype(np.float64).mean(axis=0).astype(np.float32)
