"""Grid operations of the numpy NCA: reflect padding and the depthwise convolution, with gradients.

Grids are channel-first, (C, B, H, W). A padded grid (C, B, H+2p, W+2p) is read as one flat row
per channel, so each kernel tap is a single contiguous multiply-add over a whole channel
(shifting the row by ``di * (W + 2p) + dj`` moves every cell to its neighbour at (di, dj)). The
positions that straddle a row or image border compute values nobody reads; for a 7x7 kernel on
32x32 that is about 40 % more arithmetic, repaid many times by numpy's long inner loops.
"""

from __future__ import annotations

import numpy as np


def reflect_pad(x: np.ndarray, p: int) -> np.ndarray:
    """Pad the last two axes by ``p``, mirroring without repeating the edge (torch's 'reflect')."""
    h, w = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (h + 2 * p, w + 2 * p), x.dtype)
    out[..., p : p + h, p : p + w] = x
    for k in range(1, p + 1):
        out[..., p - k, p : p + w] = x[..., k, :]
        out[..., p + h - 1 + k, p : p + w] = x[..., h - 1 - k, :]
    for k in range(1, p + 1):
        out[..., p - k] = out[..., p + k]
        out[..., p + w - 1 + k] = out[..., p + w - 1 - k]
    return out


def reflect_pad_grad(g: np.ndarray, p: int) -> np.ndarray:
    """The gradient of :func:`reflect_pad`: each padded cell's gradient goes to its mirror cell.
    Modifies ``g`` in place and returns a view of its interior."""
    h, w = g.shape[-2] - 2 * p, g.shape[-1] - 2 * p
    for k in range(1, p + 1):
        g[..., p + k] += g[..., p - k]
        g[..., p + w - 1 - k] += g[..., p + w - 1 + k]
    for k in range(1, p + 1):
        g[..., p + k, :] += g[..., p - k, :]
        g[..., p + h - 1 - k, :] += g[..., p + h - 1 + k, :]
    return g[..., p : p + h, p : p + w]


def _span(padded_shape: tuple[int, ...], k: int) -> tuple[int, int, int]:
    """(flat length per channel, row stride, positions computed) of a padded grid and kernel."""
    _, b, hp, wp = padded_shape
    length = b * hp * wp
    return length, wp, length - (k - 1) * (wp + 1)


def depthwise(padded: np.ndarray, taps: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """Valid depthwise correlation: padded (C, B, H+k-1, W+k-1), taps (C, k, k), bias (C,);
    writes (C, B, H, W) into ``out`` (which may be a view)."""
    c, k = taps.shape[0], taps.shape[1]
    length, wp, span = _span(padded.shape, k)
    flat = padded.reshape(c, length)
    acc = np.empty((c, length), padded.dtype)
    tmp = np.empty((c, span), padded.dtype)
    np.multiply(flat[:, :span], taps[:, 0, 0, None], out=acc[:, :span])
    for di in range(k):
        for dj in range(k):
            if di or dj:
                off = di * wp + dj
                np.multiply(flat[:, off : off + span], taps[:, di, dj, None], out=tmp)
                acc[:, :span] += tmp
    h, w = out.shape[-2:]
    np.add(acc.reshape(padded.shape)[:, :, :h, :w], bias[:, None, None, None], out=out)


def depthwise_grad(padded: np.ndarray, taps: np.ndarray, grad: np.ndarray, grad_taps: np.ndarray) -> np.ndarray:
    """Backward of :func:`depthwise` for the output gradient ``grad`` (C, B, H, W): adds the taps'
    gradient to ``grad_taps`` (C, k, k) and returns the padded input's gradient (C, B, H+k-1, W+k-1).
    (The bias gradient is ``grad.sum((1, 2, 3))``.)"""
    c, k = taps.shape[0], taps.shape[1]
    length, wp, span = _span(padded.shape, k)
    h, w = grad.shape[-2:]
    spread = np.zeros(padded.shape, padded.dtype)  # the output gradient at its cells' flat positions
    spread[:, :, :h, :w] = grad
    g = spread.reshape(c, length)[:, :span]
    flat = padded.reshape(c, length)
    out = np.zeros((c, length), padded.dtype)
    tmp = np.empty((c, span), padded.dtype)
    for di in range(k):
        for dj in range(k):
            off = di * wp + dj
            grad_taps[:, di, dj] += np.einsum("cq,cq->c", g, flat[:, off : off + span])
            np.multiply(g, taps[:, di, dj, None], out=tmp)
            out[:, off : off + span] += tmp
    return out.reshape(padded.shape)
