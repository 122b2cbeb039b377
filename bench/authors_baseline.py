"""The same two-stage model written the way the published research code writes it.

Kept only as the baseline of bench/bench_train.py. Its structure follows the authors' NCA
(BasicNCA2DFast / MedNCA in MECLabTUDA's code): a Conv2d with reflect padding for perception,
the state travelling as BHWC between stages and as BCHW inside a stage, a Bernoulli mask filled
in place each step, the input channel re-concatenated after every step, and autograd keeping
every step's activations. The layer shapes are ours, so the weights load from our model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fednca.config import ModelConfig


class BasicNCA(nn.Module):
    def __init__(self, channel_n: int, hidden_size: int, kernel_size: int, fire_rate: float) -> None:
        super().__init__()
        self.input_channels, self.fire_rate = 1, fire_rate
        self.conv = nn.Conv2d(channel_n, channel_n, kernel_size, padding=kernel_size // 2,
                              padding_mode="reflect", groups=channel_n)
        self.fc0 = nn.Conv2d(channel_n * 2, hidden_size, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden_size, track_running_stats=False)
        self.fc1 = nn.Conv2d(hidden_size, channel_n - 1, 1)
        self.draw_mask = self._bernoulli

    def _bernoulli(self, shape: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            stochastic = torch.zeros(shape)
            stochastic.bernoulli_(p=self.fire_rate)
        return stochastic

    def update(self, state: torch.Tensor) -> torch.Tensor:
        delta = self.conv(state)
        delta = torch.cat([state, delta], dim=1)
        delta = self.fc0(delta)
        delta = self.bn(delta)
        delta = F.relu(delta)
        delta = self.fc1(delta)
        stochastic = self.draw_mask((delta.size(0), 1, delta.size(2), delta.size(3)))
        delta = delta * stochastic
        return state[:, self.input_channels :] + delta

    def forward(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        state = x.permute(0, 3, 1, 2)  # BHWC -> BCHW
        const_inputs = state[:, : self.input_channels]
        for _ in range(steps):
            new_state = self.update(state)
            state = torch.cat([const_inputs, new_state], dim=1)
        return state.permute(0, 2, 3, 1)


class AuthorsStyleNCA(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone_ncas = nn.ModuleList(
            BasicNCA(cfg.channels, cfg.hidden, k, cfg.fire_rate) for k in cfg.kernels
        )

    def load_from(self, model: nn.Module) -> "AuthorsStyleNCA":
        """Copy the weights of a fednca.model.SegmentationNCA of the same configuration."""
        rename = {"perceive": "conv", "norm": "bn"}
        own = {}
        for name, value in model.state_dict().items():
            stage, layer, kind = name.split(".")
            own[f"backbone_ncas.{int(stage[-1]) - 1}.{rename.get(layer, layer)}.{kind}"] = value
        self.load_state_dict(own)
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, _, h, w = image.shape
        x = image.permute(0, 2, 3, 1)  # BCHW -> BHWC
        small = F.avg_pool2d(image, cfg.pool).permute(0, 2, 3, 1)
        state = torch.zeros(b, h // cfg.pool, w // cfg.pool, cfg.channels)
        state[..., :1] = small
        state = self.backbone_ncas[0](state, steps=cfg.steps[0])
        up = nn.Upsample(scale_factor=cfg.pool, mode="nearest")(state.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        state = torch.cat([x, up[..., 1:]], dim=3)
        state = self.backbone_ncas[1](state, steps=cfg.steps[1])
        return state[..., 1:2].permute(0, 3, 1, 2)
