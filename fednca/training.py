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
