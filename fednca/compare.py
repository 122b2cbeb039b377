"""What federation buys: per-site evaluation and the two baselines it is measured against.

* local-only: each site trains alone on its own images, for the same number of optimiser steps
  it spent in the federation, and is tested on its own test images;
* pooled: one model trained on every site's images put together (what a central data lake
  would give), for the federation's total number of steps, tested on each site's test images.

Jobs run in worker processes (one torch thread each), so the baselines use every core.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, TrainConfig
from .data import Dataset, concat


@dataclass(frozen=True)
class Site:
    name: str
    train: Dataset
    test: Dataset


def site_dice(weights: dict[str, np.ndarray], cfg: ModelConfig, sites: Sequence[Site], *, seed: int = 0) -> dict[str, float]:
    """Mean test Dice of one model on each site's own test images."""
    import torch

    from .model import build
    from .train import evaluate

    model = build(cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()})
    return {s.name: evaluate(model, s.test, seed=seed).dice_mean for s in sites}


def _train_job(job: tuple[ModelConfig, TrainConfig, Dataset, int, int, bool]) -> dict[str, np.ndarray]:
    import torch

    from .train import Trainer

    model_cfg, train_cfg, data, steps, seed, low_memory = job
    torch.set_num_threads(1)
    trainer = Trainer(model_cfg=model_cfg, train_cfg=train_cfg, data=data, seed=seed, low_memory=low_memory)
    trainer.run(max_steps=steps)
    return trainer.weights()


def baselines(
    sites: Sequence[Site],
    *,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    steps_per_site: dict[str, int],
    seed: int = 0,
    workers: int = 2,
    low_memory: bool = False,
) -> dict[str, dict[str, float]]:
    """{"local": {site: dice}, "pooled": {site: dice}} at the federation's compute."""
    # The pooled job (as long as all local ones together) goes first so two workers finish together.
    jobs = [(model_cfg, train_cfg, concat([s.train for s in sites]), max(1, sum(steps_per_site.values())), seed, low_memory)]
    jobs += [(model_cfg, train_cfg, s.train, max(1, steps_per_site[s.name]), seed, low_memory) for s in sites]
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        pooled, *alone = pool.map(_train_job, jobs)
    local = {s.name: site_dice(w, model_cfg, [s], seed=seed)[s.name] for s, w in zip(sites, alone)}
    return {"local": local, "pooled": site_dice(pooled, model_cfg, sites, seed=seed)}
