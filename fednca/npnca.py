"""The FedNCA segmenter in numpy: forward pass and a hand-written backward pass, no PyTorch.

The same model as :mod:`fednca.model` (same tensor names and shapes, so the same model files and
wire tensors), for sites where PyTorch is too large to install or to import. A test holds its
logits and every gradient to the PyTorch model's on the same weights, images and fire masks.

Layout: states are channel-first, (C, B, H, W), seen as (C, cells) by the 1x1 layers, so each is
one BLAS matmul (out, in) @ (in, cells), and every per-channel reduction (batch-norm statistics,
bias gradients) runs along contiguous rows. The depthwise perception convolution is in
:mod:`fednca.npops`. Backpropagation through time keeps only each step's input state (~31 MB for
the 40 + 20 steps at batch 4) and recomputes the step's intermediates while going back, as the
PyTorch model's low-memory mode does. Float32 for training; the same code runs in float64 when
given float64 weights (the tests' exactness check).

Only the depthwise perception is implemented (the ``fednca`` preset and its variants: batch norm,
biases and ``full_update`` are honoured); Med-NCA's full 3x3 perception and patch training are
refused with a :class:`~fednca.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, tensor_shapes
from .errors import ConfigError
from .npops import depthwise, depthwise_grad, reflect_pad, reflect_pad_grad

Weights = dict[str, np.ndarray]
BN_EPS = 1e-5  # BatchNorm2d's default
F32 = np.float32


def check_supported(cfg: ModelConfig) -> None:
    """Refuse a configuration this implementation does not cover, naming the field."""
    if cfg.perception != "depthwise":
        raise ConfigError("perception", f"the numpy model implements 'depthwise' only, got {cfg.perception!r}")
    if cfg.train_patch:
        raise ConfigError("train_patch", "the numpy model trains on whole images only (train_patch=0)")


def init_weights(cfg: ModelConfig, *, seed: int = 0) -> Weights:
    """Fresh weights drawn as PyTorch's defaults draw them (not the same numbers as ``model.build``).

    Convolutions: uniform in +-1/sqrt(fan_in) (kaiming-uniform with a=sqrt(5)), biases likewise;
    batch norm scale 1 and shift 0; the last 1x1 layer zero, so a fresh model leaves its state alone.
    """
    check_supported(cfg)
    rng = np.random.Generator(np.random.PCG64(seed))
    out: Weights = {}
    for name, shape in tensor_shapes(cfg).items():
        stage, layer, kind = name.split(".")
        if layer == "fc1":
            out[name] = np.zeros(shape, F32)
        elif layer == "norm":
            out[name] = (np.ones if kind == "weight" else np.zeros)(shape, F32)
        else:
            weight_shape = tensor_shapes(cfg)[f"{stage}.{layer}.weight"]
            fan_in = int(np.prod(weight_shape[1:]))
            bound = 1.0 / np.sqrt(fan_in)
            out[name] = rng.uniform(-bound, bound, size=shape).astype(F32)
    return out


@dataclass(frozen=True)
class _Stage:
    """One NCA's weights in the working layout (views of the named tensors)."""

    prefix: str
    kernel: int
    taps: np.ndarray  # (C, k, k)
    conv_bias: np.ndarray  # (C,)
    w0: np.ndarray  # (hidden, 2C)
    b0: np.ndarray | None
    gamma: np.ndarray | None  # (hidden,), None without batch norm
    beta: np.ndarray | None
    w1: np.ndarray  # (out, hidden)
    b1: np.ndarray | None
    skip: int  # leading output channels to drop (channel 0's, with full_update)


def _stage(weights: Weights, cfg: ModelConfig, index: int) -> _Stage:
    p = f"stage{index + 1}."
    h = cfg.hidden
    return _Stage(
        prefix=p,
        kernel=cfg.kernels[index],
        taps=weights[p + "perceive.weight"][:, 0],
        conv_bias=weights[p + "perceive.bias"],
        w0=weights[p + "fc0.weight"].reshape(h, -1),
        b0=weights.get(p + "fc0.bias"),
        gamma=weights.get(p + "norm.weight"),
        beta=weights.get(p + "norm.bias"),
        w1=weights[p + "fc1.weight"].reshape(weights[p + "fc1.weight"].shape[0], h),
        b1=weights.get(p + "fc1.bias"),
        skip=1 if cfg.full_update else 0,
    )


def _col(v: np.ndarray) -> np.ndarray:
    return v[:, None]


def _row_mean(x: np.ndarray) -> np.ndarray:
    """Mean of each row of a C-contiguous array. ``sum`` along the contiguous axis adds pairwise,
    so its rounding grows with log(cells), not with cells: a plain running float32 sum over
    thousands of cells, repeated over 40 steps, grows to 1e-4 of the gradients, this stays near
    1e-7 (as close as PyTorch's double accumulation) without a float64 pass over the array."""
    return x.sum(1) / x.dtype.type(x.shape[1])


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product of matching rows, one BLAS dot per row (its blocked partial sums keep the
    rounding near 1e-7 relative, see :func:`_row_mean`). Batch-norm statistics in float64 einsums
    were about an eighth of a training step."""
    return (a[:, None, :] @ b[:, :, None]).reshape(a.shape[0])


@dataclass
class _Cache:
    """A step's intermediates, recomputed from its input state during the backward pass."""

    padded: np.ndarray  # (C, B, H+2p, W+2p)
    features: np.ndarray  # (2C, N): the state, then the perception
    xhat: np.ndarray | None  # (hidden, N) normalised, with batch norm
    inv_std: np.ndarray | None  # (hidden,)
    relu: np.ndarray  # (hidden, N)


def _step(s: _Stage, state: np.ndarray, fire: np.ndarray, keep: bool) -> tuple[np.ndarray, _Cache | None]:
    """One NCA step on a (C, B, H, W) state with fire (1, N) of 0/1; returns the new state."""
    c = state.shape[0]
    n = state[0].size
    padded = reflect_pad(state, s.kernel // 2)
    features = np.empty((2 * c, n), state.dtype)
    features[:c] = state.reshape(c, n)
    depthwise(padded, s.taps, s.conv_bias, features[c:].reshape(state.shape))
    z = s.w0 @ features
    if s.b0 is not None:
        z += _col(s.b0)
    xhat = inv_std = None
    if s.gamma is not None:
        z -= _col(_row_mean(z))
        var = _row_dot(z, z) / n
        inv_std = 1 / np.sqrt(var + BN_EPS)
        z *= _col(inv_std)
        xhat = z.copy() if keep else z
        z *= _col(s.gamma)
        z += _col(s.beta)
    relu = np.maximum(z, 0, out=z)
    dx = s.w1 @ relu
    if s.b1 is not None:
        dx += _col(s.b1)
    if s.skip:
        dx = dx[s.skip :]
    dx *= fire
    new = state.copy()
    new[1:] += dx.reshape(state[1:].shape)
    cache = _Cache(padded, features, xhat, inv_std, relu) if keep else None
    return new, cache


def _step_backward(s: _Stage, state: np.ndarray, fire: np.ndarray, g_new: np.ndarray, grads: Weights) -> np.ndarray:
    """Recompute the step from its input ``state``, add its weight gradients to ``grads``
    (working layout, see :func:`_zero_grads`) and return the gradient of its input state."""
    _, cache = _step(s, state, fire, keep=True)
    assert cache is not None
    c = state.shape[0]
    n = state[0].size
    pre = s.prefix
    g_dx = g_new[1:].reshape(c - 1, n) * fire
    if s.skip:
        g_dx = np.concatenate([np.zeros((s.skip, n), g_dx.dtype), g_dx], 0)
    grads[pre + "fc1.weight"] += g_dx @ cache.relu.T
    if s.b1 is not None:
        grads[pre + "fc1.bias"] += g_dx.sum(1)
    g = s.w1.T @ g_dx  # (hidden, N): gradient of the ReLU's output
    g *= cache.relu > 0
    if s.gamma is not None:
        assert cache.xhat is not None and cache.inv_std is not None
        proj = _row_dot(g, cache.xhat)
        grads[pre + "norm.weight"] += proj
        grads[pre + "norm.bias"] += g.sum(1)
        # Batch norm on batch statistics, with gy the gradient of its output y = gamma * xhat + beta:
        # dL/dz = gamma * inv_std * (gy - mean(gy) - xhat * mean(gy * xhat)).
        g -= _col(_row_mean(g))
        g -= cache.xhat * _col(proj / n)
        g *= _col(s.gamma * cache.inv_std)
    grads[pre + "fc0.weight"] += g @ cache.features.T
    if s.b0 is not None:
        grads[pre + "fc0.bias"] += g.sum(1)
    g_features = s.w0.T @ g  # (2C, N)
    g_conv = g_features[c:].reshape(state.shape)
    grads[pre + "perceive.bias"] += g_conv.sum((1, 2, 3))
    g_padded = depthwise_grad(cache.padded, s.taps, g_conv, grads[pre + "perceive.weight"])
    g_state = g_new + g_features[:c].reshape(state.shape)
    g_state += reflect_pad_grad(g_padded, s.kernel // 2)
    return g_state


def _zero_grads(stages: tuple[_Stage, _Stage], weights: Weights) -> Weights:
    grads = {k: np.zeros(v.shape, v.dtype) for k, v in weights.items()}
    for s in stages:
        for key, like in (("perceive.weight", s.taps), ("fc0.weight", s.w0), ("fc1.weight", s.w1)):
            grads[s.prefix + key] = np.zeros_like(like)
    return grads


def _named_grads(stages: tuple[_Stage, _Stage], grads: Weights, weights: Weights) -> Weights:
    """Working-layout gradients back to the tensors' own names and shapes."""
    out = dict(grads)
    for s in stages:
        key = s.prefix + "perceive.weight"
        out[key] = grads[key][:, None]
        for key in (s.prefix + "fc0.weight", s.prefix + "fc1.weight"):
            out[key] = grads[key].reshape(weights[key].shape)
    return out


def _masks_flat(fire: np.ndarray, steps: int, dtype: np.dtype) -> np.ndarray:
    """(steps, B, [1,] H, W) of bool or 0/1 -> (steps, 1, B*H*W) of 0.0/1.0."""
    fire = np.asarray(fire)
    if fire.ndim == 5:
        fire = fire[:, :, 0]
    if fire.shape[0] < steps:
        raise ValueError(f"{fire.shape[0]} fire masks for {steps} steps")
    return fire.reshape(fire.shape[0], 1, -1).astype(dtype)


def draw_masks(rng: np.random.Generator, cfg: ModelConfig, batch: int,
               side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fire masks of one pass over ``side``-pixel images (default: the configured input size),
    (steps, B, H, W) of bool per stage, stage 1 drawn first."""
    side = cfg.input_size if side is None else side
    small = side // cfg.pool
    fire1 = rng.random((cfg.steps[0], batch, small, small), dtype=F32) < cfg.fire_rate
    fire2 = rng.random((cfg.steps[1], batch, side, side), dtype=F32) < cfg.fire_rate
    return fire1, fire2


def _check_image(cfg: ModelConfig, image: np.ndarray) -> None:
    if image.ndim != 4 or image.shape[1] != 1 or image.shape[2] != image.shape[3]:
        raise ConfigError("image", f"expected shape (batch, 1, side, side), got {tuple(image.shape)}")
    side = image.shape[2]
    if side % cfg.pool or side // cfg.pool <= cfg.kernels[0] // 2:
        raise ConfigError("image", f"{side}x{side} must be square with a side divisible by pool={cfg.pool}")


def _run(weights: Weights, cfg: ModelConfig, image: np.ndarray, masks: tuple[np.ndarray, np.ndarray],
         keep_states: bool) -> tuple[np.ndarray, tuple[_Stage, _Stage], list[np.ndarray], list[np.ndarray], tuple]:
    check_supported(cfg)
    _check_image(cfg, image)
    stages = (_stage(weights, cfg, 0), _stage(weights, cfg, 1))
    dtype = weights["stage1.fc0.weight"].dtype  # float32; float64 for exactness checks
    fire1, fire2 = _masks_flat(masks[0], cfg.steps[0], dtype), _masks_flat(masks[1], cfg.steps[1], dtype)
    b, side, p, c = image.shape[0], image.shape[2], cfg.pool, cfg.channels
    img = image[:, 0].astype(dtype)
    state = np.zeros((c, b, side // p, side // p), dtype)  # channel-first throughout
    state[0] = img.reshape(b, side // p, p, side // p, p).mean((2, 4))
    kept1: list[np.ndarray] = []
    for t in range(cfg.steps[0]):
        if keep_states:
            kept1.append(state)
        state, _ = _step(stages[0], state, fire1[t], keep=False)
    full = np.empty((c, b, side, side), dtype)
    full[0] = img
    full[1:] = np.repeat(np.repeat(state[1:], p, axis=2), p, axis=3)
    state = full
    kept2: list[np.ndarray] = []
    for t in range(cfg.steps[1]):
        if keep_states:
            kept2.append(state)
        state, _ = _step(stages[1], state, fire2[t], keep=False)
    return state[1][:, None], stages, kept1, kept2, (fire1, fire2)


def forward(weights: Weights, cfg: ModelConfig, image: np.ndarray, masks: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Image (B, 1, S, S) in [-1, 1] and fire masks (see :func:`draw_masks`) -> logits (B, 1, S, S)."""
    return _run(weights, cfg, image, masks, keep_states=False)[0]


def loss_and_grad(logits: np.ndarray, target: np.ndarray, kind: str) -> tuple[float, np.ndarray]:
    """The training loss of :func:`fednca.train.loss_fn` (BCE with logits, mean; optionally plus
    1 - soft Dice) and its gradient with respect to the logits."""
    x = logits
    t = target.astype(x.dtype)
    n = x.size
    bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    prob = 0.5 * (1 + np.tanh(0.5 * x))  # the sigmoid, without overflow
    loss = float(bce.mean(dtype=np.float64))
    grad = (prob - t) / n
    if kind == "dice_bce":
        b = x.shape[0]
        pf, tf = prob.reshape(b, -1), t.reshape(b, -1)
        num = 2 * (pf * tf).sum(1) + 1
        den = pf.sum(1) + tf.sum(1) + 1
        loss += float(1 - (num / den).mean())
        g_prob = -(2 * tf * den[:, None] - num[:, None]) / (den[:, None] ** 2) / b
        grad = grad + (g_prob * (pf * (1 - pf))).reshape(x.shape)
    elif kind != "bce":
        raise ConfigError("loss", f"must be 'bce' or 'dice_bce', got {kind!r}")
    return loss, grad.astype(x.dtype)


def gradients(weights: Weights, cfg: ModelConfig, image: np.ndarray, target: np.ndarray,
              masks: tuple[np.ndarray, np.ndarray], *, loss: str = "bce") -> tuple[float, np.ndarray, Weights]:
    """(loss, logits, gradient of the loss per weight tensor) for one batch, by backpropagation
    through both stages' steps."""
    logits, stages, kept1, kept2, (fire1, fire2) = _run(weights, cfg, image, masks, keep_states=True)
    value, g_logits = loss_and_grad(logits, target, loss)
    grads = _zero_grads(stages, weights)
    b, side, c, p = image.shape[0], image.shape[2], cfg.channels, cfg.pool
    g = np.zeros((c, b, side, side), logits.dtype)
    g[1] = g_logits[:, 0]
    for t in reversed(range(cfg.steps[1])):
        g = _step_backward(stages[1], kept2[t], fire2[t], g, grads)
    small = side // p
    g_small = np.zeros((c, b, small, small), logits.dtype)
    g_small[1:] = g[1:].reshape(c - 1, b, small, p, small, p).sum((3, 5))
    g = g_small
    for t in reversed(range(cfg.steps[0])):
        g = _step_backward(stages[0], kept1[t], fire1[t], g, grads)
    return value, logits, _named_grads(stages, grads, weights)
