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
  clips every delta first when the configuration asks for it.

Aggregators are picked by name from ``AGGREGATORS``; an unknown name is a ``ConfigError``.
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


def trimmed_mean(updates: Iterable[Update], *, trim: float = 0.1) -> dict[str, np.ndarray]:
    """Coordinate-wise mean after dropping the ``floor(trim * n)`` largest and smallest values.

    With 5 sites, ``trim`` below 0.2 drops nothing (the plain mean); 0.2 drops one at each end.
    """
    problem = _trim_problem(trim)
    if problem:
        raise AggregationError(f"trim {problem}")
    out = {}
    for name, stack in _stacked(updates).items():
        cut = int(math.floor(trim * len(stack)))
        ordered = np.sort(stack, axis=0)
        out[name] = ordered[cut : len(stack) - cut].mean(axis=0).astype(np.float32)
    return out


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
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not 0 < max_norm < math.inf:
        raise AggregationError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    norm = global_norm(delta)
    if norm <= max_norm:
        return {name: np.array(value, dtype=np.float32) for name, value in delta.items()}
    out = _scaled(delta, max_norm / norm)
    if global_norm(out) > max_norm:  # float32 rounding (at most 2**-24 relative) went up: shrink
        out = _scaled(delta, max_norm / norm * (1 - 2.0**-23))
    return out


def _scaled(delta: Delta, scale: float) -> dict[str, np.ndarray]:
    return {name: (np.asarray(value, dtype=np.float64) * scale).astype(np.float32) for name, value in delta.items()}


AGGREGATORS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "fedavg": fedavg,
    "median": median,
    "trimmed_mean": trimmed_mean,
}


@dataclass(frozen=True)
class AggregationConfig:
    method: str = "fedavg"  # a name in AGGREGATORS
    trim: float = 0.1  # trimmed_mean: fraction dropped at each end, per coordinate
    clip_norm: float | None = None  # bound on each delta's global L2 norm; None = no clipping

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in AGGREGATORS:
            raise ConfigError("method", f"unknown aggregator {self.method!r}; known: {', '.join(AGGREGATORS)}")
        problem = _trim_problem(self.trim)
        if problem:
            raise ConfigError("trim", problem)
        c = self.clip_norm
        if c is not None and (not isinstance(c, (int, float)) or isinstance(c, bool) or not 0 < c < math.inf):
            raise ConfigError("clip_norm", f"must be a finite number > 0 or null, got {c!r}")


def aggregate(updates: Iterable[Update], cfg: AggregationConfig) -> dict[str, np.ndarray]:
    """Clip each delta if ``cfg.clip_norm`` is set, then combine them with ``cfg.method``."""
    if cfg.clip_norm is not None:
        bound = cfg.clip_norm
        updates = ((clip_norm(delta, bound), weight) for delta, weight in updates)
    if cfg.method == "trimmed_mean":
        return trimmed_mean(updates, trim=cfg.trim)
    return AGGREGATORS[cfg.method](updates)


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
