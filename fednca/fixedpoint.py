"""Fixed-point encoding of weighted updates into the ring Z_{2^k}, for secure aggregation.

Masks only cancel exactly in a finite ring, so a site turns its float update into ring elements
before masking: each value is clipped to the announced bound ``B``, scaled by ``2^f`` and rounded
to an integer ``q`` with ``|q| <= Q = floor(B * 2^f)``, multiplied by the site's integer weight
(its number of samples) and reduced modulo ``2^k`` (numpy unsigned integers wrap around, which is
exactly that reduction). The coordinator adds ring vectors, reads the sum as a two's-complement
signed integer and divides by ``2^f`` and by the total weight.

Invariants, stated once:

* No overflow: the signed reading of the sum is the true integer sum only while
  ``|sum| < 2^(k-1)``. Every ``|w_i * q_i| <= max_weight * Q``, so
  ``n * max_weight * B * 2^f < 2^(k-1)`` (with k = 32: ``< 2^31``) guarantees it;
  :func:`check_range` refuses anything else with :class:`FixedPointRangeError` before a site
  encodes a single value.
* Error: rounding moves each value by at most ``2^-(f+1)``; a weighted mean of such errors is
  no larger, so the decoded weighted mean differs from the weighted mean of the *clipped* values
  by at most ``2^-(f+1)`` per coordinate (:func:`error_bound`), nothing else. Clipping is not an
  error of the encoding: it is the announced bound that also protects the sum.
* With ``f`` the largest the range allows (:func:`largest_frac_bits`) the error relative to the
  bound is at most ``n * max_weight / 2^(k-1)``: 10 sites of up to 200 samples in Z_{2^32} give
  ``<= 9.4e-7`` of ``B``, inside the goal of 1e-6 relative; larger federations keep that goal
  with a coarser weight unit or with ``k = 64``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import FedNCAError

RING_DTYPES: dict[int, np.dtype] = {16: np.dtype("<u2"), 32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SIGNED: dict[int, np.dtype] = {16: np.dtype("<i2"), 32: np.dtype("<i4"), 64: np.dtype("<i8")}


class FixedPointRangeError(FedNCAError, ValueError):
    """The announced bound, scale, weights and federation size could overflow the ring."""


@dataclass(frozen=True)
class FixedPoint:
    """The encoding a round announces: clip bound ``bound``, ``frac_bits`` = f, ring Z_{2^ring_bits}."""

    bound: float
    frac_bits: int
    ring_bits: int = 32

    def __post_init__(self) -> None:
        if self.ring_bits not in RING_DTYPES:
            raise FixedPointRangeError(f"ring_bits must be one of {sorted(RING_DTYPES)}, got {self.ring_bits}")
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise FixedPointRangeError(f"bound must be finite and > 0, got {self.bound}")
        if not 0 <= self.frac_bits < self.ring_bits:
            raise FixedPointRangeError(f"frac_bits must be in [0, {self.ring_bits}), got {self.frac_bits}")
        if self.q_max < 1:
            raise FixedPointRangeError(f"bound {self.bound} * 2^{self.frac_bits} is below one ring step")

    @property
    def dtype(self) -> np.dtype:
        return RING_DTYPES[self.ring_bits]

    @property
    def q_max(self) -> int:
        """Q: the largest integer magnitude of one encoded (unweighted) value."""
        return math.floor(self.bound * 2 ** self.frac_bits)


def check_range(fp: FixedPoint, *, n_sites: int, max_weight: int) -> None:
    """Refuse a federation whose worst-case weighted sum could wrap: needs n*w*B*2^f < 2^(k-1)."""
    if n_sites < 1 or max_weight < 1:
        raise FixedPointRangeError(f"n_sites and max_weight must be >= 1, got {n_sites}, {max_weight}")
    worst = n_sites * max_weight * fp.bound * 2 ** fp.frac_bits
    limit = 2 ** (fp.ring_bits - 1)
    if not worst < limit:
        raise FixedPointRangeError(
            f"overflow: n_sites {n_sites} * max_weight {max_weight} * bound {fp.bound} * 2^{fp.frac_bits}"
            f" = {worst:.4g} is not < 2^{fp.ring_bits - 1}; lower frac_bits, the bound or the weights")


def largest_frac_bits(*, bound: float, n_sites: int, max_weight: int, ring_bits: int = 32) -> int:
    """The finest scale f that :func:`check_range` accepts for this federation."""
    for f in range(ring_bits - 1, -1, -1):
        if n_sites * max_weight * bound * 2 ** f < 2 ** (ring_bits - 1):
            return f
    raise FixedPointRangeError(
        f"no scale fits: n_sites {n_sites} * max_weight {max_weight} * bound {bound} >= 2^{ring_bits - 1}")


def error_bound(fp: FixedPoint) -> float:
    """Largest absolute error of one coordinate of the decoded weighted mean: 2^-(f+1)."""
    return 2.0 ** -(fp.frac_bits + 1)


def clip(values: np.ndarray, fp: FixedPoint) -> np.ndarray:
    """The values the encoding represents: float64, clipped to [-B, B] (the reference for tests)."""
    return np.clip(np.asarray(values, dtype=np.float64), -fp.bound, fp.bound)


def encode(values: np.ndarray, *, weight: int, fp: FixedPoint) -> np.ndarray:
    """One site's weighted update as ring elements (a new 1-D array; ``values`` is not mutated).

    Non-finite values are refused: a NaN would otherwise become an arbitrary ring element that
    no one could ever see in the masked sum.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise FixedPointRangeError("update has non-finite values")
    if weight < 1 or weight * fp.q_max >= 2 ** (fp.ring_bits - 1):
        raise FixedPointRangeError(f"weight {weight} out of range for {fp}")
    q = np.clip(np.rint(flat * 2.0 ** fp.frac_bits), -fp.q_max, fp.q_max).astype(np.int64)
    weighted = q * np.int64(weight)  # |q * w| < 2^(k-1) <= 2^63: exact in int64
    return weighted.astype(_SIGNED[fp.ring_bits]).view(fp.dtype)


def ring_sum(vectors: list[np.ndarray], fp: FixedPoint) -> np.ndarray:
    """Sum of ring vectors modulo 2^k (inputs not mutated)."""
    total = np.zeros_like(vectors[0], dtype=fp.dtype)
    for v in vectors:
        total += v.astype(fp.dtype, copy=False)  # wraps modulo 2^k
    return total


def decode_mean(total: np.ndarray, *, total_weight: int, fp: FixedPoint) -> np.ndarray:
    """The weighted mean (float64) from the ring sum of weighted encodings and the sum of weights."""
    if total_weight < 1:
        raise FixedPointRangeError(f"total_weight must be >= 1, got {total_weight}")
    signed = np.asarray(total, dtype=fp.dtype).view(_SIGNED[fp.ring_bits]).astype(np.float64)
    return signed / (2.0 ** fp.frac_bits * total_weight)
