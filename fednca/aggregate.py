"""Aggregation of model deltas: FedAvg, coordinate-wise median and trimmed mean, norm clipping.

A delta is ``dict[str, np.ndarray]`` with the model's tensor names and shapes (local minus
global). An update is a pair ``(delta, samples)``. Every function here is pure: no I/O, no
logging, no state, and the caller's arrays are never written to. Results are float32, whatever
the input dtype (deltas travel as float16 by default).

* ``fedavg`` consumes its input one update at a time and keeps only a float64 running sum, so
  its memory does not grow with the number of sites: the caller may pass a generator that reads
  each update from disk as it is needed.
* ``median`` and ``trimmed_mean`` are the robust choices for sites that may misbehave. They need
  every update at once (a coordinate-wise order statistic cannot be streamed) and they ignore the
  sample counts: a site that lies about its sample count must not be able to outweigh the others.
* ``clip_norm`` bounds one delta's global L2 norm (over all tensors together); ``aggregate``
  clips every delta first when the configuration asks for it, to a fixed bound and/or to a
  multiple of the round's own median delta norm (``bound_by_median``), and caps each site's sample
  weight at a multiple of the round's median (``cap_weights``), so that no single site's update,
  whatever it claims, weighs or pulls more than a few honest ones.
* ``check_model`` is the last gate before a model is published: finite, bounded in magnitude, and
  not moved further from the previous model than a round may move it.

Aggregators are picked by name from ``AGGREGATORS``; an unknown name is a ``ConfigError``.
The defaults (docs/rounds.md says why) resist one poisoning site in five: every delta bounded by
twice the round's median norm, then the coordinate-wise mean of what is left after dropping at
least the largest and the smallest value of every coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from .errors import ConfigError, FedNCAError

Delta = Mapping[str, np.ndarray]
Update = tuple[Delta, float]


class AggregationError(FedNCAError, ValueError):
    """The updates cannot be aggregated (none given, mismatched tensors, bad weights)."""


def _layout(delta: Delta) -> dict[str, tuple[int, ...]]:
    return {name: tuple(np.shape(value)) for name, value in delta.items()}


def _checked(updates: Iterable[Update]) -> Iterator[tuple[Delta, float]]:
    """Yield the updates one by one after checking each against the first one's tensor layout."""
    layout: dict[str, tuple[int, ...]] | None = None
    for index, (delta, weight) in enumerate(updates):
        if not isinstance(weight, (int, float, np.integer, np.floating)) or isinstance(weight, bool):
            raise AggregationError(f"update {index}: weight must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise AggregationError(f"update {index}: weight must be finite and >= 0, got {weight!r}")
        for name, value in delta.items():
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                raise AggregationError(f"update {index}: tensor {name!r} is not floating point")
        if layout is None:
            layout = _layout(delta)
            if not layout:
                raise AggregationError("update 0: the delta has no tensors")
        elif _layout(delta) != layout:
            raise AggregationError(f"update {index}: {_difference(layout, _layout(delta))}")
        yield delta, float(weight)
    if layout is None:
        raise AggregationError("no updates to aggregate")


def _difference(want: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]]) -> str:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        return f"tensor {missing[0]!r} is missing"
    if extra:
        return f"unexpected tensor {extra[0]!r}"
    name = next(n for n in want if want[n] != got[n])
    return f"tensor {name!r} has shape {got[name]}, expected {want[name]}"


def fedavg(updates: Iterable[Update]) -> dict[str, np.ndarray]:
    """Mean of the deltas weighted by their sample counts, streamed one update at a time."""
    total: dict[str, np.ndarray] = {}
    weight_sum = 0.0
    for delta, weight in _checked(updates):
        for name, value in delta.items():
            scaled = np.asarray(value, dtype=np.float64) * weight  # a new array: the input is untouched
            if name in total:
                total[name] += scaled
            else:
                total[name] = scaled
        weight_sum += weight
    if weight_sum <= 0:
        raise AggregationError("the sample counts add up to 0: nothing to weight by")
    return {name: (value / weight_sum).astype(np.float32) for name, value in total.items()}


def _stacked(updates: Iterable[Update]) -> dict[str, np.ndarray]:
    """Every update's tensor of each name stacked along a new first axis, in float64."""
    columns: dict[str, list[np.ndarray]] = {}
    for delta, _ in _checked(updates):
        for name, value in delta.items():
            columns.setdefault(name, []).append(np.asarray(value, dtype=np.float64))
    return {name: np.stack(values) for name, values in columns.items()}


def median(updates: Iterable[Update]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of the deltas (an even count takes the mean of the middle two)."""
    return {name: np.median(stack, axis=0).astype(np.float32) for name, stack in _stacked(updates).items()}


def trimmed_mean(updates: Iterable[Update], *, trim: float = 0.1, min_trim: int = 0) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``floor(trim * n)`` largest and smallest values.

    With 5 sites, ``trim`` below 0.2 drops nothing (the plain mean); 0.2 drops one at each end.
    ``min_trim`` drops at least that many at each end whenever at least one value is left
    (``n > 2 * min_trim``), so that trimming still trims at small n.
    """
    problem = _trim_problem(trim)
    if problem:
        raise AggregationError(f"trim {problem}")
    out = {}
    for name, stack in _stacked(updates).items():
        cut = trim_count(len(stack), trim=trim, min_trim=min_trim)
        ordered = np.sort(stack, axis=0)
        out[name] = ordered[cut : len(stack) - cut].mean(axis=0).astype(np.float32)
    return out


def trim_count(n: int, *, trim: float, min_trim: int = 0) -> int:
    """How many values ``trimmed_mean`` drops at each end of ``n``."""
    cut = int(math.floor(trim * n))
    if n > 2 * min_trim:
        cut = max(cut, min_trim)
    return cut


def _trim_problem(trim: float) -> str | None:
    if not isinstance(trim, (int, float)) or isinstance(trim, bool) or not 0 <= trim < 0.5:
        return f"must be a number in [0, 0.5), got {trim!r}"
    return None


def global_norm(delta: Delta) -> float:
    """L2 norm of all of a delta's tensors taken together, computed in float64."""
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in delta.values()))


def clip_norm(delta: Delta, max_norm: float) -> dict[str, np.ndarray]:
    """A float32 copy of ``delta`` scaled down so that its global L2 norm is at most ``max_norm``.

    A delta already within the bound is returned unscaled. The bound holds after rounding to
    float32: if rounding pushes the norm over, the scale is shrunk by a few float32 ulps.
    """
    _, out = clip_scale(delta, max_norm)
    return {name: np.array(value, dtype=np.float32) for name, value in delta.items()} if out is None else out


def clip_scale(delta: Delta, max_norm: float, *, norm: float | None = None) -> tuple[float, dict[str, np.ndarray] | None]:
    """The factor :func:`clip_norm` scales ``delta`` by (1.0 when it is within the bound) and the
    scaled float32 copy (None when unscaled). ``norm`` is ``global_norm(delta)`` when known."""
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not 0 < max_norm < math.inf:
        raise AggregationError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    norm = global_norm(delta) if norm is None else norm
    if norm <= max_norm:
        return 1.0, None
    scale = max_norm / norm
    out = scaled(delta, scale)
    if global_norm(out) > max_norm:  # float32 rounding (at most 2**-24 relative) went up: shrink
        scale = max_norm / norm * (1 - 2.0**-23)
        out = scaled(delta, scale)
    return scale, out


def lower_median(values: Iterable[float]) -> float:
    """The lower middle value: with two values, the smaller one (a liar cannot lift it alone)."""
    ordered = sorted(values)
    if not ordered:
        raise AggregationError("no updates to aggregate")
    return ordered[(len(ordered) - 1) // 2]


def bound_by_median(updates: Iterable[Update], factor: float) -> list[tuple[dict[str, np.ndarray], float]]:
    """Each delta clipped to ``factor`` times the lower median of the round's delta norms.

    An honest round's deltas have norms of one order of magnitude; a poisoning delta is huge, or
    its harm grows with its norm. Bounding by the round's own median needs no tuned constant and
    holds while fewer than half of the sites lie (the median is then an honest norm).
    """
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 0 < factor < math.inf:
        raise AggregationError(f"the median norm factor must be a finite number > 0, got {factor!r}")
    listed = list(_checked(updates))
    bound = factor * lower_median(global_norm(delta) for delta, _ in listed)
    if bound <= 0:  # every delta is zero, or most are: nothing to scale
        return [({n: np.array(v, dtype=np.float32) for n, v in delta.items()}, w) for delta, w in listed]
    return [(clip_norm(delta, bound), weight) for delta, weight in listed]


def cap_weights(updates: Iterable[Update], ratio: float) -> list[tuple[Delta, float]]:
    """Sample weights capped at ``ratio`` times the round's lower median weight.

    Sample counts are the site's own claim; a site that claims a thousand times more images than
    the others would otherwise steer FedAvg alone.
    """
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 1 <= ratio < math.inf:
        raise AggregationError(f"the weight ratio must be a finite number >= 1, got {ratio!r}")
    listed = list(_checked(updates))
    cap = ratio * lower_median(weight for _, weight in listed)
    return [(delta, min(weight, cap)) for delta, weight in listed]


def scaled(delta: Delta, scale: float) -> dict[str, np.ndarray]:
    """``delta`` times ``scale`` (in float64), as float32."""
    return {name: (np.asarray(value, dtype=np.float64) * scale).astype(np.float32) for name, value in delta.items()}


AGGREGATORS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "fedavg": fedavg,
    "median": median,
    "trimmed_mean": trimmed_mean,
}


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


@dataclass(frozen=True)
class AggregationConfig:
    method: str = "trimmed_mean"  # a name in AGGREGATORS
    trim: float = 0.2  # trimmed_mean: fraction dropped at each end, per coordinate
    min_trim: int = 1  # trimmed_mean: at least this many dropped at each end while n > 2 * min_trim
    clip_norm: float | None = None  # fixed bound on each delta's global L2 norm; None = none
    median_norm_factor: float | None = 2.0  # bound each delta by this x the round's median norm; None = none
    max_weight_ratio: float | None = 2.0  # fedavg: cap sample weights at this x the round's median; None = none
    max_model_change: float | None = 0.5  # a new model may move at most this x the previous model's norm
    max_abs_weight: float = 1e4  # no weight of a published model may exceed this in magnitude

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in AGGREGATORS:
            raise ConfigError("method", f"unknown aggregator {self.method!r}; known: {', '.join(AGGREGATORS)}")
        problem = _trim_problem(self.trim)
        if problem:
            raise ConfigError("trim", problem)
        if not isinstance(self.min_trim, int) or isinstance(self.min_trim, bool) or not 0 <= self.min_trim <= 16:
            raise ConfigError("min_trim", f"must be a whole number from 0 to 16, got {self.min_trim!r}")
        for field in ("clip_norm", "median_norm_factor", "max_model_change"):
            value = getattr(self, field)
            if value is not None and not _positive(value):
                raise ConfigError(field, f"must be a finite number > 0 or null, got {value!r}")
        r = self.max_weight_ratio
        if r is not None and (not _positive(r) or r < 1):
            raise ConfigError("max_weight_ratio", f"must be a finite number >= 1 or null, got {r!r}")
        if not _positive(self.max_abs_weight):
            raise ConfigError("max_abs_weight", f"must be a finite number > 0, got {self.max_abs_weight!r}")


def aggregate(updates: Iterable[Update], cfg: AggregationConfig) -> dict[str, np.ndarray]:
    """Bound each delta (``cfg.clip_norm``, then ``cfg.median_norm_factor``), cap the sample
    weights (``cfg.max_weight_ratio``), then combine the deltas with ``cfg.method``."""
    if cfg.clip_norm is not None:
        bound = cfg.clip_norm
        updates = ((clip_norm(delta, bound), weight) for delta, weight in updates)
    if cfg.median_norm_factor is not None:
        updates = bound_by_median(updates, cfg.median_norm_factor)
    if cfg.max_weight_ratio is not None and cfg.method == "fedavg":
        updates = cap_weights(updates, cfg.max_weight_ratio)
    options = {"trimmed_mean": {"trim": cfg.trim, "min_trim": cfg.min_trim}}.get(cfg.method, {})
    return AGGREGATORS[cfg.method](updates, **options)


def check_model(new: Delta, previous: Delta, cfg: AggregationConfig) -> str | None:
    """Why ``new`` must not be published after ``previous``, or None when it may.

    The gate behind every aggregator: a model is finite, no weight is larger than
    ``cfg.max_abs_weight``, and the step from the previous model is at most
    ``cfg.max_model_change`` times the previous model's norm (an honest round moves it by a few
    per cent; docs/rounds.md has the figures).
    """
    if _layout(new) != _layout(previous):
        return f"the new model does not fit the previous one: {_difference(_layout(previous), _layout(new))}"
    for name, value in new.items():
        array = np.asarray(value)
        if not np.all(np.isfinite(array)):
            return f"tensor {name!r} is not finite"
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        if peak > cfg.max_abs_weight:
            return f"tensor {name!r} holds {peak:.3g}, above max_abs_weight {cfg.max_abs_weight:g}"
    if cfg.max_model_change is not None:
        step = global_norm({n: np.asarray(new[n], np.float64) - np.asarray(previous[n], np.float64) for n in new})
        allowed = cfg.max_model_change * global_norm(previous)
        if step > allowed:
            return (f"the model would move by {step:.3g}, more than max_model_change {cfg.max_model_change:g} "
                    f"x the previous model's norm ({allowed:.3g})")
    return None


def apply(global_tensors: Delta, delta: Delta) -> dict[str, np.ndarray]:
    """The next global model: ``global + delta`` per tensor, in float32. Inputs are not modified."""
    if _layout(global_tensors) != _layout(delta):
        raise AggregationError(f"delta does not fit the model: {_difference(_layout(global_tensors), _layout(delta))}")
    out = {}
    for name, value in global_tensors.items():
        new = np.asarray(value, dtype=np.float32) + np.asarray(delta[name], dtype=np.float32)
        if not np.all(np.isfinite(new)):
            raise AggregationError(f"tensor {name!r} of the new model is not finite")
        out[name] = new
    return out
