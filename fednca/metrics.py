"""Segmentation metrics on numpy arrays: Dice per image and the NQM quality score.

Pure functions; no torch, so the onnxruntime inference path can use them too.
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """Dice per image of binary masks shaped (N, ...). Two empty masks agree perfectly (1.0)."""
    pred = np.asarray(pred, dtype=bool).reshape(len(pred), -1)
    truth = np.asarray(truth, dtype=bool).reshape(len(truth), -1)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    inter = np.logical_and(pred, truth).sum(1)
    total = pred.sum(1) + truth.sum(1)
    return np.where(total == 0, 1.0, (2.0 * inter + eps) / (total + eps))


def nqm(probabilities: np.ndarray, *, eps: float = 1e-8) -> np.ndarray:
    """Med-NCA's quality score per image from stochastic passes shaped (passes, N, ...).

    Sum over pixels of the standard deviation between passes divided by the sum of their mean:
    near 0 when every pass agrees, larger when the automaton has not settled on an answer.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim < 3:
        raise ValueError(f"expected (passes, N, ...), got shape {p.shape}")
    p = p.reshape(p.shape[0], p.shape[1], -1)
    return p.std(0).sum(-1) / (p.mean(0).sum(-1) + eps)
