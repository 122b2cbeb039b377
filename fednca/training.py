"""What both trainers share and neither needs PyTorch for: the chunk report, the evaluation result,
the checkpoint error, and reading a checkpoint's metadata.

``fednca.train`` (PyTorch, the reference) and ``fednca.nptrain`` (numpy, for the site) both use
these, so a caller catches one ``CheckpointError`` and reads one ``Chunk`` whichever trainer runs,
and importing them never loads PyTorch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .config import TrainConfig
from .data import Dataset
from .errors import FedNCAError


class CheckpointError(FedNCAError):
    """A checkpoint is unreadable, belongs to another configuration, or to the other trainer."""


@dataclass(frozen=True)
class Chunk:
    steps: int  # optimiser steps done in this chunk
    samples: int
    loss: float  # mean training loss over the chunk (nan if no step)
    seconds: float


@dataclass(frozen=True)
class Evaluation:
    dice: np.ndarray  # per image
    nqm: np.ndarray | None  # per image, when more than one pass
    probabilities: np.ndarray  # (N, 1, S, S) mean sigmoid over passes

    @property
    def dice_mean(self) -> float:
        return float(self.dice.mean())

    @property
    def dice_std(self) -> float:
        return float(self.dice.std())


def checkpoint_metadata(blob: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (its JSON header's ``__metadata__``)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


class DataOrder:
    """The data order both trainers follow: a fresh permutation of the dataset every epoch from
    ``order_rng``, taken ``batch_size`` rows at a time (a last partial batch is left out).

    The trainer sets ``data``, ``train_cfg``, ``order_rng``, ``order``, ``epoch`` and ``cursor``;
    its checkpoint saves and restores them, so a resumed run takes the same batches.
    """

    data: Dataset
    train_cfg: TrainConfig
    order_rng: np.random.Generator
    order: np.ndarray
    epoch: int
    cursor: int  # batches of this epoch already done

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.data) // self.train_cfg.batch_size)

    def _new_order(self) -> np.ndarray:
        return self.order_rng.permutation(len(self.data))

    def _next_indices(self) -> np.ndarray:
        """The rows of the next batch; moves on to a new epoch after the last full batch."""
        b = self.train_cfg.batch_size
        idx = self.order[self.cursor * b : (self.cursor + 1) * b]
        self.cursor += 1
        if self.cursor >= self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = self._new_order()
        return idx
