"""Local training in resumable chunks, and evaluation.

A :class:`Trainer` owns everything that decides the next weights: the model, Adam's moments, the
fire-mask generator, the data-order generator, the current epoch's order and the position in it.
``checkpoint()`` turns all of it into bytes and ``Trainer.restore`` turns them back, so a run
stopped after any chunk (even by SIGKILL) and resumed ends bit-identical to an uninterrupted one.

A chunk is bounded by a number of optimiser steps, by seconds on an injected clock, or both.
Between federated rounds a site swaps in the new global weights and keeps its Adam moments.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import checkpoint_format
from .config import ModelConfig, TrainConfig
from .data import Dataset
from .errors import FedNCAError
from .metrics import dice, nqm
from .training import CheckpointError, Chunk, DataOrder, Evaluation, checkpoint_metadata
from .model import SegmentationNCA, build, tensors

FORMAT = checkpoint_format.TORCH


def loss_fn(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    if kind == "bce":
        return bce
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    soft_dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + (1 - soft_dice).mean()


class Trainer(DataOrder):
    def __init__(
        self,
        *,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        data: Dataset,
        seed: int = 0,
        low_memory: bool = False,
        weights: dict[str, np.ndarray] | None = None,
    ) -> None:
        if len(data) == 0:
            raise FedNCAError("training data is empty")
        self.model_cfg, self.train_cfg, self.data = model_cfg, train_cfg, data
        self.low_memory = low_memory
        self.model: SegmentationNCA = build(model_cfg, seed=seed)
        if weights is not None:
            self.set_weights(weights)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr, betas=train_cfg.betas)
        self.masks = torch.Generator().manual_seed(seed)  # fire masks
        self.order_rng = np.random.Generator(np.random.PCG64(seed))  # data order and crops
        self.epoch = 0
        self.cursor = 0  # batches of this epoch already done
        self.steps = 0  # optimiser steps since the start
        self.order = self._new_order()

    # -- data order -------------------------------------------------------------------------
    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self._next_indices()
        return torch.from_numpy(self.data.images[idx]), torch.from_numpy(self.data.masks[idx])

    # -- training ---------------------------------------------------------------------------
    def step(self) -> float:
        images, masks = self._next_batch()
        crop = None
        side = self.model_cfg.train_patch
        if side:
            top, left = (int(v) for v in self.order_rng.integers(0, images.shape[-1] - side + 1, size=2))
            crop = (top, left, side)
            masks = masks[:, :, top : top + side, left : left + side]
        self.model.train()
        logits = self.model(images, generator=self.masks, low_memory=self.low_memory, crop=crop)
        loss = loss_fn(logits, masks, self.train_cfg.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return float(loss.detach())

    def run(
        self,
        *,
        max_steps: int | None = None,
        max_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Chunk:
        """Train until ``max_steps`` steps are done or ``max_seconds`` have passed (at least one step)."""
        if max_steps is None and max_seconds is None:
            raise ValueError("a chunk needs max_steps or max_seconds")
        start, losses = clock(), []
        while max_steps is None or len(losses) < max_steps:
            losses.append(self.step())
            if max_seconds is not None and clock() - start >= max_seconds:
                break
        n = len(losses)
        return Chunk(n, n * self.train_cfg.batch_size, float(np.mean(losses)) if n else float("nan"), clock() - start)

    # -- weights ----------------------------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in tensors(self.model).items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load new (e.g. global) weights in place; the optimiser keeps its moments."""
        own = self.model.state_dict()
        if set(weights) != set(own) or any(tuple(weights[k].shape) != tuple(own[k].shape) for k in own):
            raise FedNCAError("weights do not match the model's tensors")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(torch.from_numpy(np.asarray(weights[k], dtype=np.float32)))

    # -- checkpoint -------------------------------------------------------------------------
    def checkpoint(self, **extra: object) -> bytes:
        """Everything needed to continue bit-identically, as safetensors bytes (no pickle)."""
        arrays = {f"model/{k}": v for k, v in self.weights().items()}
        names = dict(self.model.named_parameters())
        steps = {}
        for name, p in names.items():
            st = self.optimizer.state.get(p)
            if st:
                arrays[f"adam/{name}/exp_avg"] = st["exp_avg"].numpy().copy()
                arrays[f"adam/{name}/exp_avg_sq"] = st["exp_avg_sq"].numpy().copy()
                steps[name] = float(st["step"])
        arrays["rng/masks"] = self.masks.get_state().numpy().copy()
        arrays["data/order"] = self.order.astype(np.int64)
        meta = {
            "format": FORMAT,
            "model_cfg": self.model_cfg.to_dict(),
            "train_cfg": self.train_cfg.to_dict(),
            "samples": len(self.data),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "steps": self.steps,
            "adam_steps": steps,
            "order_rng": self.order_rng.bit_generator.state,
            "low_memory": self.low_memory,
            "extra": extra,
        }
        return st_save(arrays, metadata={"fednca": json.dumps(meta)})

    @classmethod
    def restore(cls, blob: bytes, *, data: Dataset) -> tuple["Trainer", dict]:
        """A trainer continuing exactly where ``checkpoint()`` left off; also returns its ``extra``."""
        try:
            arrays = st_load(blob)

            meta = json.loads(checkpoint_metadata(blob)["fednca"])
            problem = checkpoint_format.format_problem(meta.get("format"), own=FORMAT)
            if problem is not None:
                raise CheckpointError(problem)
            model_cfg = ModelConfig.from_dict(meta["model_cfg"])
            train_cfg = TrainConfig.from_dict(meta["train_cfg"])
        except (KeyError, ValueError, TypeError, SafetensorError) as e:
            raise CheckpointError(f"unreadable checkpoint: {e}") from None
        if meta["samples"] != len(data):
            raise CheckpointError(f"checkpoint was made on {meta['samples']} samples, the dataset has {len(data)}")
        t = cls(model_cfg=model_cfg, train_cfg=train_cfg, data=data, low_memory=meta["low_memory"])
        t.set_weights({k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
        for name, p in t.model.named_parameters():
            if name in meta["adam_steps"]:
                t.optimizer.state[p] = {
                    "step": torch.tensor(meta["adam_steps"][name], dtype=torch.float32),
                    "exp_avg": torch.from_numpy(arrays[f"adam/{name}/exp_avg"].copy()),
                    "exp_avg_sq": torch.from_numpy(arrays[f"adam/{name}/exp_avg_sq"].copy()),
                }
        t.masks.set_state(torch.from_numpy(arrays["rng/masks"].copy()))
        t.order = arrays["data/order"].copy()
        t.order_rng.bit_generator.state = meta["order_rng"]
        t.epoch, t.cursor, t.steps = meta["epoch"], meta["cursor"], meta["steps"]
        return t, meta["extra"]


@torch.no_grad()
def evaluate(model: SegmentationNCA, data: Dataset, *, passes: int = 1, seed: int = 0) -> Evaluation:
    """Dice per image of the mean of ``passes`` stochastic passes, and NQM when passes > 1.

    Every pass of every image runs on its own, as ``fednca segment`` runs it on a device: batch
    statistics then describe that image alone, and the passes are independent samples.
    """
    g = torch.Generator().manual_seed(seed)
    model.eval()
    probs = np.empty((passes, len(data), 1) + data.images.shape[2:], np.float32)
    for i in range(len(data)):
        x = torch.from_numpy(data.images[i : i + 1])
        for k in range(passes):
            probs[k, i] = torch.sigmoid(model(x, generator=g)).numpy()[0]
    mean = probs.mean(0)
    return Evaluation(
        dice=dice(mean > 0.5, data.masks > 0.5),
        nqm=nqm(probs) if passes > 1 else None,
        probabilities=mean,
    )
