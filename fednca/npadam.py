"""Adam in numpy, the update of ``torch.optim.Adam`` (no weight decay, no amsgrad) written out.

Same order of operations in float32, with the same scalars: the first moment moves towards the
gradient by ``1 - beta1``, the second is scaled by ``beta2`` and gains ``(1 - beta2) * g * g``,
both bias corrections are computed in double from the step count, and eps is added after dividing
the root of the second moment by the root of its bias correction:

    param -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

The two agree to a few float32 ulps, not bit for bit: PyTorch fuses the moment updates into
multiply-adds (FMA, one rounding where numpy rounds twice), and its float32 square root on CPU is
not correctly rounded (one ulp off in ~15 % of elements on x86, measured against double precision). The moments are named by weight tensor,
so a site keeps them across rounds while the weights are replaced.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-8  # torch.optim.Adam's default


class Adam:
    def __init__(self, *, lr: float, betas: tuple[float, float], eps: float = EPS) -> None:
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg: dict[str, np.ndarray] = {}
        self.exp_avg_sq: dict[str, np.ndarray] = {}
        self.step_count: dict[str, int] = {}  # per tensor, as PyTorch keeps it

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update ``params`` in place from ``grads`` (same names and shapes)."""
        beta1, beta2 = self.betas
        for name, p in params.items():
            g = grads[name]
            if name not in self.exp_avg:
                self.exp_avg[name] = np.zeros_like(p)
                self.exp_avg_sq[name] = np.zeros_like(p)
                self.step_count[name] = 0
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            t = self.step_count[name] = self.step_count[name] + 1
            m += (g - m) * (1 - beta1)
            v *= beta2
            v += (1 - beta2) * g * g
            step_size = self.lr / (1 - beta1**t)
            denom = np.sqrt(v) / math.sqrt(1 - beta2**t)
            denom += self.eps
            p += -step_size * m / denom

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(arrays by 'NAME/exp_avg' and 'NAME/exp_avg_sq', step count by NAME), copies."""
        arrays: dict[str, np.ndarray] = {}
        for name in self.exp_avg:
            arrays[f"{name}/exp_avg"] = self.exp_avg[name].copy()
            arrays[f"{name}/exp_avg_sq"] = self.exp_avg_sq[name].copy()
        return arrays, dict(self.step_count)

    def load_state(self, arrays: dict[str, np.ndarray], steps: dict[str, int]) -> None:
        """The inverse of :meth:`state`."""
        self.exp_avg = {n: np.array(arrays[f"{n}/exp_avg"], dtype=np.float32) for n in steps}
        self.exp_avg_sq = {n: np.array(arrays[f"{n}/exp_avg_sq"], dtype=np.float32) for n in steps}
        self.step_count = {n: int(t) for n, t in steps.items()}
