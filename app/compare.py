"""What federation buys: per-site evaluation and the two baselines it is measured against.

* local-only: each site trains alone on its own images, for the same number of optimiser steps
  it spent in the federation, and is tested on its own test images;
* pooled: one model trained on every site's images put together (what a central data lake
  would give), for the federation's total number of steps, tested on each site's test images.

Jobs run in worker processes (one torch thread each), so the baselines use every core.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fednca.config import ModelConfig, TrainConfig
from fednca.data import Dataset, concat


@dataclass(frozen=True)
class Site:
    name: str
    train: Dataset
    test: Dataset


def site_dice(weights: dict[str, np.ndarray], cfg: ModelConfig, sites: Sequence[Site], *, seed: int = 0) -> dict[str, float]:
    """Mean test Dice of one model on each site's own test images."""
    import torch

    from fednca.model import build
    from fednca.train import evaluate

    model = build(cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()})
    return {s.name: evaluate(model, s.test, seed=seed).dice_mean for s in sites}


def _train_job(job: tuple[ModelConfig, TrainConfig, Dataset, int, int, bool]) -> dict[str, np.ndarray]:
    import torch

    from fednca.train import Trainer

    model_cfg, train_cfg, data, steps, seed, low_memory = job
    torch.set_num_threads(1)
    trainer = Trainer(model_cfg=model_cfg, train_cfg=train_cfg, data=data, seed=seed, low_memory=low_memory)
    trainer.run(max_steps=steps)
    return trainer.weights()


def _die_with_parent() -> None:
    """Ask Linux to end this worker when the demo process ends, however it ends (SIGTERM, SIGKILL):
    a baseline job runs for minutes and would otherwise go on training for nobody."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own shutdown still ends idle workers


def _worker_start(background: bool) -> None:
    _die_with_parent()
    if background:
        os.nice(10)  # baselines fill the cores' idle time; the federation they are compared with comes first


class Baselines:
    """The local-only and pooled runs, started at once in worker processes; ``result()`` waits.

    ``steps_per_site`` is the compute each site spends in the federation (optimiser steps at the
    same batch size); the pooled model gets their sum.
    """

    def __init__(
        self,
        sites: Sequence[Site],
        *,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        steps_per_site: dict[str, int],
        seed: int = 0,
        workers: int = 2,
        low_memory: bool = False,
        background: bool = False,
    ) -> None:
        self.sites, self.model_cfg, self.seed = list(sites), model_cfg, seed
        pooled = concat([s.train for s in sites])
        # The pooled job (as long as all local ones together) goes first so two workers finish together.
        jobs = [(model_cfg, train_cfg, pooled, max(1, sum(steps_per_site.values())), seed, low_memory)]
        jobs += [(model_cfg, train_cfg, s.train, max(1, steps_per_site[s.name]), seed, low_memory) for s in sites]
        self._pool = mp.get_context("spawn").Pool(processes=workers, initializer=_worker_start,
                                                  initargs=(background,))
        self._results = [self._pool.apply_async(_train_job, (job,)) for job in jobs]

    def cancel(self) -> None:
        """Stop every job now, running ones included."""
        self._pool.terminate()
        self._pool.join()

    def result(self) -> dict[str, dict[str, float]]:
        """{"local": {site: dice}, "pooled": {site: dice}}."""
        try:
            pooled, *alone = [r.get() for r in self._results]
        finally:
            self._pool.terminate()  # every job has answered (or failed): nothing left to wait for
            self._pool.join()
        local = {s.name: site_dice(w, self.model_cfg, [s], seed=self.seed)[s.name] for s, w in zip(self.sites, alone)}
        return {"local": local, "pooled": site_dice(pooled, self.model_cfg, self.sites, seed=self.seed)}


def baselines(sites: Sequence[Site], **kw) -> dict[str, dict[str, float]]:
    """Local-only and pooled Dice at the federation's compute (see :class:`Baselines`)."""
    return Baselines(sites, **kw).result()
