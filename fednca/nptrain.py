"""Local training without PyTorch: the interface of :class:`fednca.train.Trainer` on the numpy model.

A site whose device cannot carry PyTorch (its install size, its ~220 MB of memory just to import)
trains with this one: same chunks (steps and/or seconds on an injected clock), same weights in and
out (the model file and wire tensors are the same), Adam as ``torch.optim.Adam`` computes it, the
same data order (the same permutation generator and seed), and checkpoints as safetensors bytes
with a JSON header: everything that decides the next weights (weights, Adam's moments, the
fire-mask generator, the data-order generator, epoch, cursor) is in them, so a run stopped after
any chunk and restored ends bit-identical to an uninterrupted run of this trainer.

Differences from the PyTorch trainer, by design: fire masks come from a numpy generator, so the
same seed does not give the same masks as there; fresh weights are drawn by numpy
(:func:`fednca.npnca.init_weights`), a site normally starts from the round's global weights
anyway; checkpoints carry their own format name, each trainer refuses the other's. Whole-image
training only (the ``fednca`` preset and its variants, see :mod:`fednca.npnca`).
"""

from __future__ import annotations

import json
import time
from typing import Callable

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import checkpoint_format, npnca
from .config import ModelConfig, TrainConfig, tensor_shapes
from .data import Dataset
from .errors import FedNCAError
from .metrics import dice, nqm
from .training import CheckpointError, Chunk, DataOrder, Evaluation, checkpoint_metadata
from .npadam import Adam

FORMAT = checkpoint_format.NUMPY


def _mask_rng(seed: int) -> np.random.Generator:
    """The fire-mask generator: its own stream, independent of the data order's ``PCG64(seed)``."""
    return np.random.Generator(np.random.PCG64([seed, 1]))


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
        npnca.check_supported(model_cfg)
        self.model_cfg, self.train_cfg, self.data = model_cfg, train_cfg, data
        self.low_memory = low_memory  # accepted for the interface: this trainer always keeps only states
        self.params = npnca.init_weights(model_cfg, seed=seed)
        if weights is not None:
            self.set_weights(weights)
        self.optimizer = Adam(lr=train_cfg.lr, betas=train_cfg.betas)
        self.masks = _mask_rng(seed)
        self.order_rng = np.random.Generator(np.random.PCG64(seed))  # data order
        self.epoch = 0
        self.cursor = 0  # batches of this epoch already done
        self.steps = 0  # optimiser steps since the start
        self.order = self._new_order()

    # -- data order -------------------------------------------------------------------------
    def _next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The next batch's images and masks: copies of those rows only, never of the dataset."""
        idx = self._next_indices()
        return self.data.images[idx], self.data.masks[idx]

    # -- training ---------------------------------------------------------------------------
    def step(self) -> float:
        images, targets = self._next_batch()
        fire = npnca.draw_masks(self.masks, self.model_cfg, images.shape[0], images.shape[-1])
        loss, _, grads = npnca.gradients(self.params, self.model_cfg, images, targets, fire, loss=self.train_cfg.loss)
        self.optimizer.step(self.params, grads)
        self.steps += 1
        return loss

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
        """The weights by name, float32 copies (what travels and is stored)."""
        return {k: v.copy() for k, v in self.params.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Load new (e.g. global) weights in place; the optimiser keeps its moments."""
        own = self.params
        if set(weights) != set(own) or any(tuple(np.shape(weights[k])) != own[k].shape for k in own):
            raise FedNCAError("weights do not match the model's tensors")
        for k, v in own.items():
            v[...] = np.asarray(weights[k], dtype=np.float32)

    # -- checkpoint -------------------------------------------------------------------------
    def checkpoint(self, **extra: object) -> bytes:
        """Everything needed to continue bit-identically, as safetensors bytes (no pickle)."""
        arrays = {f"model/{k}": v for k, v in self.weights().items()}
        moments, adam_steps = self.optimizer.state()
        arrays.update({f"adam/{k}": v for k, v in moments.items()})
        arrays["data/order"] = self.order.astype(np.int64)
        meta = {
            "format": FORMAT,
            "model_cfg": self.model_cfg.to_dict(),
            "train_cfg": self.train_cfg.to_dict(),
            "samples": len(self.data),
            "epoch": self.epoch,
            "cursor": self.cursor,
            "steps": self.steps,
            "adam_steps": adam_steps,
            "order_rng": self.order_rng.bit_generator.state,
            "mask_rng": self.masks.bit_generator.state,
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
            if meta["samples"] != len(data):
                raise CheckpointError(f"checkpoint was made on {meta['samples']} samples, the dataset has {len(data)}")
            t = cls(model_cfg=model_cfg, train_cfg=train_cfg, data=data, low_memory=bool(meta["low_memory"]))
            weights = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
            if {k: v.shape for k, v in weights.items()} != tensor_shapes(model_cfg):
                raise CheckpointError("checkpoint weights do not match its model configuration")
            t.set_weights(weights)
            t.optimizer.load_state({k[5:]: v for k, v in arrays.items() if k.startswith("adam/")},
                                   {str(k): int(v) for k, v in meta["adam_steps"].items()})
            t.order = arrays["data/order"].copy()
            if sorted(t.order.tolist()) != list(range(len(data))):
                raise CheckpointError("checkpoint data order is not a permutation of the dataset")
            t.order_rng.bit_generator.state = meta["order_rng"]
            t.masks.bit_generator.state = meta["mask_rng"]
            t.epoch, t.cursor, t.steps = int(meta["epoch"]), int(meta["cursor"]), int(meta["steps"])
        except (KeyError, ValueError, TypeError, SafetensorError) as e:
            raise CheckpointError(f"unreadable checkpoint: {e}") from None
        return t, meta["extra"]


def evaluate(weights: dict[str, np.ndarray], cfg: ModelConfig, data: Dataset, *, passes: int = 1,
             seed: int = 0) -> Evaluation:
    """Dice per image of the mean of ``passes`` stochastic passes, and NQM when passes > 1; every
    pass of every image on its own (batch statistics of that image alone), as in fednca.train."""
    rng = _mask_rng(seed)
    probs = np.empty((passes, len(data), 1) + data.images.shape[2:], np.float32)
    for i in range(len(data)):
        x = data.images[i : i + 1]
        for k in range(passes):
            logits = npnca.forward(weights, cfg, x, npnca.draw_masks(rng, cfg, 1, x.shape[-1]))
            probs[k, i] = 0.5 * (1 + np.tanh(0.5 * logits[0]))
    mean = probs.mean(0)
    return Evaluation(
        dice=dice(mean > 0.5, data.masks > 0.5),
        nqm=nqm(probs) if passes > 1 else None,
        probabilities=mean,
    )
