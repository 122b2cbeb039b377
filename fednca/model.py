"""The two-stage Neural Cellular Automaton segmenter (FedNCA / Med-NCA).

A state grid of ``channels`` channels per pixel; channel 0 holds the image and is never updated,
channel 1 of the final state is the segmentation logit. Stage 1 runs on the image average-pooled
by ``pool``; its hidden channels are upsampled (nearest) and continue at full resolution in stage 2,
a second NCA with its own weights.

Each step every cell perceives its neighbourhood (a learned convolution, reflect padding) next to
its own state, a 1x1 network proposes an update, and a random half of the cells (one Bernoulli
mask per cell, shared by all channels) apply it. The masks are an explicit input of every step, so
the same masks give the same output here, in the low-memory mode and in the exported ONNX graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .errors import ConfigError


class _DepthwiseConv(torch.autograd.Function):
    """A valid depthwise convolution whose backward pass is two fast forward convolutions.

    PyTorch's own depthwise backward on CPU is an order of magnitude slower than its forward
    (7x7 on a 32x32 grid: ~40 ms against ~2 ms here), and it is most of a training step.
    """

    @staticmethod
    def forward(ctx, padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(padded, weight)
        return F.conv2d(padded, weight, bias, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        padded, weight = ctx.saved_tensors
        b, c, h, w = grad.shape
        grad = grad.contiguous()
        grad_in = F.conv_transpose2d(grad, weight, groups=c)
        # Correlate each (image, channel) plane with its own gradient: one group per plane.
        planes = padded.reshape(1, b * c, *padded.shape[2:])
        grad_w = F.conv2d(planes, grad.reshape(b * c, 1, h, w), groups=b * c)
        grad_w = grad_w.reshape(b, c, *weight.shape[2:]).sum(0).unsqueeze(1)
        return grad_in, grad_w, grad.sum((0, 2, 3))


def depthwise_conv(padded: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The perception convolution; in NCHW with gradients, through the fast backward above.
    (Channels-last tensors keep PyTorch's own backward, which is faster there.)"""
    if padded.is_contiguous() and torch.is_grad_enabled() and conv.weight.requires_grad:
        return _DepthwiseConv.apply(padded, conv.weight, conv.bias)
    return F.conv2d(padded, conv.weight, conv.bias, groups=conv.groups)


class NCA(nn.Module):
    """One cellular automaton: perception, 1x1 update network, stochastic residual update."""

    def __init__(self, cfg: ModelConfig, kernel: int) -> None:
        super().__init__()
        c, h = cfg.channels, cfg.hidden
        self.pad = kernel // 2
        if cfg.perception == "depthwise":
            self.perceive = nn.Conv2d(c, c, kernel, groups=c, bias=True)
            self.perceive2 = None
            features = 2 * c
        else:  # Med-NCA: two full 3x3 convolutions
            self.perceive = nn.Conv2d(c, c, kernel, bias=True)
            self.perceive2 = nn.Conv2d(c, c, kernel, bias=True)
            features = 3 * c
        self.fc0 = nn.Conv2d(features, h, 1, bias=cfg.hidden_bias)
        # Batch statistics always, also at inference: the published model never tracked running stats.
        self.norm = nn.BatchNorm2d(h, track_running_stats=False) if cfg.batch_norm else nn.Identity()
        self.fc1 = nn.Conv2d(h, c if cfg.full_update else c - 1, 1, bias=cfg.out_bias)
        self.skip = 1 if cfg.full_update else 0  # leading update channels to drop (channel 0's)
        nn.init.zeros_(self.fc1.weight)
        if self.fc1.bias is not None:
            nn.init.zeros_(self.fc1.bias)

    def forward(self, state: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        """One step. state: (B, C, H, W); fire: (B, 1, H, W) of 0.0/1.0. Returns the new state."""
        padded = F.pad(state, (self.pad,) * 4, mode="reflect")
        if self.perceive2 is None:
            parts = [state, depthwise_conv(padded, self.perceive)]
        else:
            parts = [state, self.perceive(padded), self.perceive2(padded)]
        hidden = F.relu(self.norm(self.fc0(torch.cat(parts, 1))))  # (B, hidden, H, W)
        dx = self.fc1(hidden)  # (B, C-1 [+1], H, W)
        if self.skip:
            dx = dx[:, self.skip :]
        return torch.cat([state[:, :1], torch.addcmul(state[:, 1:], dx, fire)], 1)


class SegmentationNCA(nn.Module):
    """Image (B, 1, S, S) in [-1, 1] -> logits (B, 1, S, S)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage1 = NCA(cfg, cfg.kernels[0])
        self.stage2 = NCA(cfg, cfg.kernels[1])

    def check_input(self, image: torch.Tensor) -> None:
        if image.dim() != 4 or image.shape[1] != 1:
            raise ConfigError("image", f"expected shape (batch, 1, side, side), got {tuple(image.shape)}")
        side, width = image.shape[2], image.shape[3]
        if side != width or side % self.cfg.pool or side // self.cfg.pool <= self.cfg.kernels[0] // 2:
            raise ConfigError(
                "image", f"{side}x{width} must be square with a side divisible by pool={self.cfg.pool}"
            )

    def forward(
        self,
        image: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        low_memory: bool = False,
        crop: tuple[int, int, int] | None = None,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
        channels_last: bool | None = None,
    ) -> torch.Tensor:
        """Run both stages; fire masks are drawn from ``generator``, or given as ``masks``.

        ``masks=(fire1, fire2)``: one mask per step and stage, shaped (steps, B, 1, H, W), true
        where a cell updates (the inputs of the exported ONNX graph).

        ``low_memory`` recomputes each step during the backward pass instead of keeping its
        activations. ``crop=(top, left, side)`` runs stage 2 only on that patch (Med-NCA training).
        ``channels_last`` picks the states' memory layout (default: NHWC, NCHW in low-memory mode);
        the two give the same results up to float summation order.
        """
        self.check_input(image)
        cfg, b = self.cfg, image.shape[0]

        def fire(state: torch.Tensor) -> torch.Tensor:
            shape = (b, 1, state.shape[2], state.shape[3])
            return (torch.rand(shape, generator=generator, device=state.device) < cfg.fire_rate).to(state.dtype)

        def run(nca: NCA, state: torch.Tensor, steps: int, given: torch.Tensor | None) -> torch.Tensor:
            for t in range(steps):
                mask = fire(state) if given is None else given[t].to(state.dtype)
                if low_memory and torch.is_grad_enabled():
                    state = checkpoint(nca, state, mask, use_reentrant=False)
                else:
                    state = nca(state, mask)
            return state

        # Channels-last states take oneDNN's NHWC kernels, measured faster than NCHW here at one
        # and two threads; the low-memory mode stays NCHW, which peaks about 120 MB lower
        # (bench/bench_train.py).
        if channels_last is None:
            channels_last = not low_memory
        last = torch.channels_last if channels_last else torch.contiguous_format
        fire1, fire2 = (None, None) if masks is None else masks
        small = F.avg_pool2d(image, cfg.pool)
        state = torch.cat([small, small.new_zeros(b, cfg.channels - 1, *small.shape[2:])], 1)
        state = run(self.stage1, state.contiguous(memory_format=last), cfg.steps[0], fire1)  # (B, C, S/pool, S/pool)
        hidden = F.interpolate(state[:, 1:], scale_factor=cfg.pool, mode="nearest")
        state = torch.cat([image, hidden], 1).contiguous(memory_format=last)  # (B, C, S, S)
        if crop is not None:
            top, left, side = crop
            state = state[:, :, top : top + side, left : left + side]
        state = run(self.stage2, state, cfg.steps[1], fire2)
        return state[:, 1:2]


def build(cfg: ModelConfig, *, seed: int = 0) -> SegmentationNCA:
    """A freshly initialised model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SegmentationNCA(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights by name, float32, detached copies (what travels and is stored)."""
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in model.state_dict().items()}


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of a model with this configuration (no weights allocated)."""
    with torch.device("meta"):
        model = SegmentationNCA(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
