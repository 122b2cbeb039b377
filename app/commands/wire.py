"""``fednca wire``: the size on the wire of each message for a model preset.

Builds real messages (fresh keys, the preset's initial weights, a small random delta) and prints
their lengths: the round announcement, an update with a float16 and a float32 delta, the largest
float16 update the field limits allow (63-character ids, four metrics), and a receipt.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from fednca import wire
from fednca.config import preset, train_preset
from fednca.keys import CoordinatorKeys, Registry, SiteKeys

UPDATE_BUDGET = 16 << 10
ANNOUNCEMENT_BUDGET = 40 << 10
FEDERATION = "liver-us"
SITE = "clinic-07"


@dataclass(frozen=True)
class Sample:
    """A coordinator, one enrolled site and round 1 of a federation, for sizes and benchmarks."""

    shapes: Mapping[str, tuple[int, ...]]
    coordinator: CoordinatorKeys
    site: SiteKeys
    registry: Registry
    announcement: bytes
    base_sha256: str

    def delta(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {n: rng.normal(0.0, 1e-3, s).astype(np.float32) for n, s in self.shapes.items()}

    def update(self, *, dtype: str = "float16", seed: int = 0, delta: Mapping[str, np.ndarray] | None = None,
               **fields: object) -> bytes:
        """A sealed update of the sample site for round 1; ``fields`` override the header's."""
        values: dict = dict(federation=FEDERATION, site=SITE, round=1, base_sha256=self.base_sha256,
                            samples=128, steps=96, partial=False, metrics={"loss": 0.3141593, "dice": 0.8271828})
        values.update(fields)
        delta = self.delta(seed) if delta is None else delta
        return wire.make_update(**values, delta=delta, dtype=dtype, signing_key=self.site.signing,  # type: ignore[arg-type]
                                coordinator_box=self.coordinator.box.public_key)


def sample(preset_name: str = "fednca") -> Sample:
    from fednca.model import build, tensor_shapes, tensors  # torch: only to build the model

    cfg = preset(preset_name)
    weights = {n: t.numpy() for n, t in tensors(build(cfg, seed=0)).items()}
    coordinator, site = CoordinatorKeys.generate(), SiteKeys.generate()
    announcement = wire.make_announcement(
        federation=FEDERATION, round=1, deadline=1_900_000_000, quorum=3, train=train_preset(preset_name),
        model=cfg, tensors=weights, signing_key=coordinator.signing,
    )
    return Sample(shapes=tensor_shapes(cfg), coordinator=coordinator, site=site,
                  registry=Registry(sites={SITE: site.verify_key}), announcement=announcement,
                  base_sha256=wire.model_sha256(weights))


def sizes(preset_name: str = "fednca") -> dict[str, int]:
    s = sample(preset_name)
    params = sum(math.prod(shape) for shape in s.shapes.values())
    longest = dict(federation="f" * 63, site="s" * 63, round=2**31 - 1, samples=10**9, steps=10**9,
                   metrics={f"metric_{i:09d}": -1.234567e-100 for i in range(4)})
    receipt = wire.make_receipt(federation=FEDERATION, site=SITE, round=1, update_id="0" * 32,
                                reason="wrong_base_model", signing_key=s.coordinator.signing)
    return {
        "parameters": params,
        "float32_weights": 4 * params,
        "announcement": len(s.announcement),
        "update_float16": len(s.update()),
        "update_float16_largest": len(s.update(**longest)),
        "update_float32": len(s.update(dtype="float32")),
        "receipt": len(receipt),
    }


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="fednca", choices=["fednca", "mednca"])
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    n = sizes(args.preset)
    if args.json:
        print(json.dumps({"preset": args.preset, **n}, sort_keys=True))
        return 0
    default = args.preset == "fednca"  # the budgets are the default model's
    rows = [
        ("round announcement", n["announcement"], f"budget {ANNOUNCEMENT_BUDGET:,}" if default else ""),
        ("update, float16 delta", n["update_float16"], f"budget {UPDATE_BUDGET:,}" if default else ""),
        ("update, float16, largest", n["update_float16_largest"], "63-character ids, 4 metrics"),
        ("update, float32 delta", n["update_float32"], ""),
        ("receipt", n["receipt"], ""),
    ]
    print(f"model {args.preset}: {n['parameters']:,} parameters, {n['float32_weights']:,} bytes as float32")
    for name, size, note in rows:
        print(f"  {name:<26} {size:>9,} bytes  {note}".rstrip())
    return 0
