"""8-bit quantisation of weight deltas, per tensor, with error feedback.

A tensor ``x`` travels as one scale ``s = max|x| / 127`` (float32) and integers
``q = round(x / s)`` in -127..127 (int8); the receiver reads ``q * s``. Each value is off by at most
``s / 2``, a quarter of a percent of the tensor's largest magnitude.

Error feedback keeps that error from adding up over rounds: the sender keeps the residual
``x - q * s`` and adds it to the next delta it sends, so the sum of what it sent tracks the sum of
the true deltas within one round's error, however many rounds go by. A site keeps the residual of
its updates; the coordinator keeps the residual of the global model it publishes as a delta.

Both sides compute ``q * s`` and ``base + q * s`` with the same float32 numpy operations (each
one correctly rounded, the same on every machine), so a site that applies a published delta to the
model it holds gets the coordinator's model bit for bit: the sha256 the signed announcement names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

LEVELS = 127  # symmetric: -128 never travels


@dataclass(frozen=True)
class Quantised:
    """Per tensor name: int8 values and a float32 scale (0 for an all-zero tensor)."""

    values: Mapping[str, np.ndarray]
    scales: Mapping[str, np.float32]

    def dequantised(self) -> dict[str, np.ndarray]:
        return {name: dequantise(self.values[name], self.scales[name]) for name in self.values}


def quantise(x: Any) -> tuple[np.ndarray, np.float32]:
    """``x`` (finite) as int8 values and a float32 scale; the error per value is at most scale / 2."""
    a = np.asarray(x, dtype=np.float32)
    peak = float(np.max(np.abs(a))) if a.size else 0.0
    scale = np.float32(peak / LEVELS)
    if scale == 0 or not np.isfinite(scale):  # all zero (or too small for a normal float32 scale)
        return np.zeros(a.shape, np.int8), np.float32(0.0)
    q = np.clip(np.rint(a / scale), -LEVELS, LEVELS).astype(np.int8)
    return q, scale


def dequantise(values: np.ndarray, scale: np.float32 | float) -> np.ndarray:
    """``values * scale`` in float32: the one definition both sides use."""
    return np.asarray(values, dtype=np.int8).astype(np.float32) * np.float32(scale)


def apply(base: Mapping[str, Any], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` per tensor in float32: the one definition both sides use."""
    return {name: np.asarray(base[name], dtype=np.float32) + np.asarray(delta[name], dtype=np.float32)
            for name in base}


def quantise_with_feedback(
    delta: Mapping[str, Any], residual: Mapping[str, np.ndarray] | None,
) -> tuple[Quantised, dict[str, np.ndarray]]:  # fmt: skip
    """Quantise ``delta + residual``; returns what to send and the new residual to keep.

    A residual whose names or shapes differ from the delta's (another model) is dropped.
    """
    values: dict[str, np.ndarray] = {}
    scales: dict[str, np.float32] = {}
    kept: dict[str, np.ndarray] = {}
    usable = residual is not None and residual.keys() == delta.keys() and all(
        np.shape(residual[k]) == np.shape(delta[k]) for k in delta)
    for name in sorted(delta):
        x = np.asarray(delta[name], dtype=np.float32)
        if usable:
            x = x + np.asarray(residual[name], dtype=np.float32)  # type: ignore[index]
        q, s = quantise(x)
        values[name], scales[name] = q, s
        kept[name] = x - dequantise(q, s)
    return Quantised(values=values, scales=scales), kept
