"""The federated UNet baselines: FedAvg of a ``unet.UNet2D`` across the same phantom sites.

Each site is a process of its own (spawned, one PyTorch thread), so its peak RSS is what a device
would need to train that model, and it keeps its model and Adam moments across rounds as a daemon
does. The coordinator is this process. Every round crosses the project's wire format
(:mod:`fednca.wire_large`) for real: the coordinator signs the whole float32 model (kind ``M``),
each site opens it (signature, size, sha256), trains ``local_epochs`` over its images in the
order the NCA trainers use (:class:`fednca.training.DataOrder`, seeded ``seed + i``), and sends its
delta signed and sealed in the method's uplink layout (float32, float16 or top-k: uplink only,
the full model down, as the paper sends them); the coordinator opens every update with every check
and aggregates with :func:`fednca.aggregate.aggregate`. Bytes are the lengths of those messages.

No broker carries these messages: a paper-size UNet's model is ~148 MB, far past mosquitto's
``max_packet_size`` (1 MiB in the generated configuration), which therefore does not apply here.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from fednca.config import TrainConfig
from fednca.data import Dataset
from fednca.keys import Registry
from fednca.training import DataOrder
from fednca.wire_large import Uplink, make_large_model, make_large_update, open_large_model, open_large_update

from .methods import FEDAVG, TEST_START, Method, Plan, UNetSpec
from .records import RoundResult

FEDERATION = "reproduce"


def build_unet(spec: UNetSpec, *, seed: int) -> Any:
    """``UNet2D(in_channels=1, out_classes=1, padding=True)`` with ``spec``'s depth and width, its
    weights drawn from a generator seeded by ``seed``."""
    import torch
    from unet import UNet2D

    torch.manual_seed(seed)
    return UNet2D(in_channels=1, out_classes=1, padding=True, num_encoding_blocks=spec.blocks,
                  out_channels_first_layer=spec.width)


def weights(model: Any) -> dict[str, np.ndarray]:
    """The model's parameters by name (the package shares some modules under two names in its
    state_dict: parameters name each tensor once)."""
    return {k: v.detach().numpy().copy() for k, v in model.named_parameters()}


def shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def load(model: Any, tensors: dict[str, np.ndarray]) -> None:
    import torch

    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(torch.from_numpy(np.array(tensors[k], np.float32)))  # a writable copy


def evaluate(model: Any, data: Dataset) -> float:
    """Mean test Dice of one model on a site's test images (logit > 0 is foreground)."""
    import torch

    from fednca.metrics import dice

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.from_numpy(data.images[i : i + 8])) for i in range(0, len(data), 8)])
    return float(dice(logits.numpy() > 0, data.masks > 0.5).mean())


# ------------------------------------------------------------------------------------- a site


@dataclass(frozen=True)
class SiteJob:
    """Everything a site process needs (picklable): its data, model, recipe and keys."""

    name: str
    index: int
    spec: UNetSpec
    train: TrainConfig
    uplink: Uplink
    train_images: int
    size: int
    seed: int
    signing_seed: bytes
    coordinator_box: bytes
    coordinator_verify: bytes


@dataclass(frozen=True)
class SiteReport:
    payload: bytes  # the signed, sealed update
    train_s: float
    peak_rss: int  # bytes, this site process since it started


class _Site(DataOrder):
    def __init__(self, job: SiteJob) -> None:
        import torch

        from fednca.phantom import phantom_dataset

        self.job, self.train_cfg = job, job.train
        self.data = phantom_dataset(site=job.index, count=job.train_images, size=job.size, seed=job.seed)
        self.model = build_unet(job.spec, seed=job.seed + job.index)  # replaced by the first global model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=job.train.lr, betas=job.train.betas)
        self.order_rng = np.random.Generator(np.random.PCG64(job.seed + job.index))
        self.epoch, self.cursor, self.order = 0, 0, self._new_order()
        self.shapes = shapes(self.model)

    def round(self, round: int, model_message: bytes) -> SiteReport:
        import torch
        import torch.nn.functional as F

        job = self.job
        model = open_large_model(model_message, coordinator_keys=VerifyKey(job.coordinator_verify),
                                 federation=FEDERATION, shapes=self.shapes)
        load(self.model, dict(model.tensors))
        started = time.monotonic()
        self.model.train()
        steps = job.train.local_epochs * self.batches_per_epoch
        for _ in range(steps):
            idx = self._next_indices()
            logits = self.model(torch.from_numpy(self.data.images[idx]))
            loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(self.data.masks[idx]))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        train_s = time.monotonic() - started
        local = weights(self.model)
        delta = {k: local[k] - model.tensors[k] for k in local}
        payload = make_large_update(
            federation=FEDERATION, site=job.name, round=round, base_sha256=model.model_sha256,
            samples=steps * job.train.batch_size, steps=steps, partial=False, metrics={"train_loss": float(loss.detach())},
            delta=delta, shapes=self.shapes, uplink=job.uplink, signing_key=SigningKey(job.signing_seed),
            coordinator_box=PublicKey(job.coordinator_box))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return SiteReport(payload=payload, train_s=train_s, peak_rss=peak)


def _site_main(conn: Any, job: SiteJob) -> None:
    """A site process: one PyTorch thread; answers each (round, model message) with its report."""
    import torch

    torch.set_num_threads(1)
    site = _Site(job)
    conn.send("ready")
    while (item := conn.recv()) is not None:
        round, message = item
        conn.send(site.round(round, message))


# ------------------------------------------------------------------------------ the federation


def run_unet(method: Method, plan: Plan, tests: Sequence[Dataset], *,
             on_round: Callable[[RoundResult], None]) -> tuple[list[RoundResult], int]:
    """Train ``method`` (a UNet) for the plan's rounds; returns the rounds and the parameter count."""
    import torch

    from fednca.aggregate import aggregate, apply

    assert method.unet is not None
    torch.set_num_threads(1)
    coordinator_sign, coordinator_box = SigningKey.generate(), PrivateKey.generate()
    site_keys = [SigningKey.generate() for _ in range(plan.sites)]
    names = [f"site{i}" for i in range(plan.sites)]
    registry = Registry(sites={n: k.verify_key for n, k in zip(names, site_keys)})
    train = TrainConfig(batch_size=plan.batch, local_epochs=plan.local_epochs)
    model = build_unet(method.unet, seed=plan.seed)
    global_model, model_shapes = weights(model), shapes(model)
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    try:
        for i, name in enumerate(names):
            parent, child = ctx.Pipe()
            job = SiteJob(name=name, index=i, spec=method.unet, train=train, uplink=method.uplink,
                          train_images=plan.train_images, size=plan.size, seed=plan.seed,
                          signing_seed=bytes(site_keys[i]), coordinator_box=bytes(coordinator_box.public_key),
                          coordinator_verify=bytes(coordinator_sign.verify_key))
            proc = ctx.Process(target=_site_main, args=(child, job), name=f"unet-{name}", daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        for conn in pipes:
            if conn.recv() != "ready":
                raise RuntimeError("a UNet site process did not start")
        results = []
        for r in range(1, plan.rounds_of(method) + 1):
            message = make_large_model(federation=FEDERATION, round=r, tensors=global_model, shapes=model_shapes,
                                       signing_key=coordinator_sign)
            base = open_large_model(message, coordinator_keys=coordinator_sign.verify_key, federation=FEDERATION,
                                    shapes=model_shapes).model_sha256
            for conn in pipes:  # every site trains at once, as the daemons do
                conn.send((r, message))
            reports: list[SiteReport] = [conn.recv() for conn in pipes]
            updates = [open_large_update(rep.payload, topic_site=name, coordinator_keys=coordinator_box,
                                         registry=registry, federation=FEDERATION, round=r, base_sha256=base,
                                         shapes=model_shapes)
                       for name, rep in zip(names, reports)]
            delta = aggregate([(dict(u.delta), float(u.header.samples)) for u in updates], FEDAVG)
            global_model = apply(global_model, delta)
            load(model, global_model)
            result = RoundResult(
                method=method.name, round=r, dice={n: evaluate(model, t) for n, t in zip(names, tests)},
                bytes_up={n: len(rep.payload) for n, rep in zip(names, reports)},
                bytes_down={n: len(message) for n in names},
                train_s={n: rep.train_s for n, rep in zip(names, reports)},
                peak_rss={n: rep.peak_rss for n, rep in zip(names, reports)})
            results.append(result)
            on_round(result)
            del message, reports, updates, delta
        return results, sum(int(np.prod(s)) for s in model_shapes.values())
    finally:
        for conn in pipes:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()


def site_test_sets(plan: Plan) -> list[Dataset]:
    """Each site's test images: frames of patients none of the sites trains on."""
    from fednca.phantom import phantom_dataset

    return [phantom_dataset(site=i, count=plan.test_images, size=plan.size, seed=plan.seed, start=TEST_START)
            for i in range(plan.sites)]
