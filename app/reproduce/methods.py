"""What the reproduction compares, and on what: the methods of the FedNCA paper's figure and the
plan (federation size, rounds, recipe) they all share.

Every method trains on the same phantom federation: site ``i`` trains on frames 0..n-1 of phantom
site ``i`` (seeded by the plan's seed, its trainer by ``seed + i``) and is tested on frames of
other patients (from ``TEST_START``), so only the model and what crosses the wire differ. The
recipe is the paper's: batch 4, 3 local epochs, Adam 1e-3, BCE, 64x64 inputs, FedAvg weighted by
samples (equal here, so the same as by local steps) with no clipping or robust trimming.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from fednca.aggregate import AggregationConfig
from fednca.wire_large import Uplink

TEST_START = 10_000  # test frames come from other patients than any training frame
# The paper's aggregation: plain FedAvg, no norm bound, no weight cap, no model gate.
FEDAVG = AggregationConfig(method="fedavg", median_norm_factor=None, max_weight_ratio=None, max_model_change=None)


@dataclass(frozen=True)
class UNetSpec:
    """A ``unet.UNet2D(in_channels=1, out_classes=1, padding=True)`` with these two knobs; the
    paper used the package's defaults (5 blocks, 64 channels in the first layer)."""

    blocks: int = 5
    width: int = 64


@dataclass(frozen=True)
class Method:
    """One curve of the figure. ``family`` is ``nca`` (real daemons and coordinator on the in-memory
    broker) or ``unet`` (one process per site, the coordinator in this process, real messages)."""

    name: str
    label: str
    family: str
    preset: str = "fednca"  # nca: the model preset (fednca or mednca)
    unet: UNetSpec | None = None
    uplink: Uplink = Uplink()
    max_rounds: int | None = None  # fewer rounds than the plan's, for the costliest methods


@dataclass(frozen=True)
class Plan:
    sites: int = 5
    rounds: int = 10
    train_images: int = 16  # per site: two patients
    test_images: int = 24  # per site: other patients
    local_epochs: int = 3
    batch: int = 4
    size: int = 64
    seed: int = 0
    nca_steps: tuple[int, int] = (40, 20)  # the published FedNCA recipe
    mednca_steps: tuple[int, int] | None = None  # None: the Med-NCA preset's own (64, 64)
    methods: tuple[Method, ...] = field(default_factory=tuple)

    def rounds_of(self, method: Method) -> int:
        return min(self.rounds, method.max_rounds or self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "rounds": self.rounds, "train_images": self.train_images,
                "test_images": self.test_images, "local_epochs": self.local_epochs, "batch": self.batch,
                "size": self.size, "seed": self.seed, "nca_steps": list(self.nca_steps),
                "mednca_steps": None if self.mednca_steps is None else list(self.mednca_steps),
                "methods": {m.name: self.rounds_of(m) for m in self.methods}}


SMALL = UNetSpec(blocks=4, width=16)  # 573,249 parameters with unet 0.8.1
PAPER = UNetSpec()  # 36,950,273 with unet 0.8.1 (68,328,066 with the paper's unet 0.7.7)

METHODS: tuple[Method, ...] = (
    Method(name="fednca", label="FedNCA (published recipe)", family="nca", uplink=Uplink("float32")),
    Method(name="unet-small", label="Fed UNet 4x16", family="unet", unet=SMALL),
    Method(name="unet-small-fp16", label="Fed UNet 4x16, float16 up", family="unet", unet=SMALL,
           uplink=Uplink("float16")),
    Method(name="unet-small-top25", label="Fed UNet 4x16, top-25% up", family="unet", unet=SMALL,
           uplink=Uplink("topk", fraction=0.25)),
    Method(name="unet-small-top1", label="Fed UNet 4x16, top-1% up", family="unet", unet=SMALL,
           uplink=Uplink("topk", fraction=0.01)),
    Method(name="unet-paper", label="Fed UNet (paper's defaults)", family="unet", unet=PAPER, max_rounds=2),
    Method(name="mednca", label="Med-NCA preset", family="nca", preset="mednca", uplink=Uplink("float32"),
           max_rounds=3),
)


def by_name(names: list[str] | None) -> tuple[Method, ...]:
    """The methods named (all when None), in the table's order."""
    if not names:
        return METHODS
    known = {m.name: m for m in METHODS}
    unknown = [n for n in names if n not in known]
    if unknown:
        from fednca.errors import ConfigError

        raise ConfigError("--methods", f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(m for m in METHODS if m.name in names)


def full_plan(methods: tuple[Method, ...] = METHODS, **overrides: Any) -> Plan:
    return replace(Plan(methods=methods), **overrides)


def quick_plan(methods: tuple[Method, ...] | None = None, **overrides: Any) -> Plan:
    """Two sites, one round of one epoch on four images, short NCA runs: every path of the full
    run (daemons, coordinator, both wire formats, the paper-size UNet's messages) in a minute or two.
    Bytes per round do not depend on these sizes, so the byte ordering it shows is the full run's."""
    chosen = methods or tuple(m for m in METHODS if m.name in ("fednca", "unet-small", "unet-paper"))
    base = Plan(sites=2, rounds=1, train_images=4, test_images=4, local_epochs=1, nca_steps=(4, 2),
                mednca_steps=(4, 4), methods=chosen)
    return replace(base, **overrides)
