"""Dice of the honest sites after a few rounds of a phantom federation with poisoning sites.

Each aggregation rule runs the same federation: non-IID phantom sites, each keeping its own
Trainer (and so its Adam moments) across rounds as a real site does, swapping in the global
model with ``set_weights`` at the start of every round. The last ``p`` sites are hostile: they
are enrolled and send well-formed updates (finite float32 values, a sample count the wire
accepts, at most 10**9), crafted every round by one of these attacks:

* ``huge``: every coordinate 1e30, claiming 10**9 samples;
* ``flip10``: minus ten times the mean honest update of the round, claiming 10**9 samples (a
  stand-in for the poisoner's own update flipped and scaled: an update trained on its own
  images would be of the same kind and size, and the stand-in saves its training);
* ``negsum``: minus the sum of the honest updates of the round, claiming the honest sample
  count (an attacker that sees every other update; under plain FedAvg one such site cancels
  the round exactly, two reverse it).

Poisoning sites do not train. Every rule's result goes through ``check_model`` before it is
published; a refused round (or one whose aggregation fails) keeps the previous model and is
counted. Honest deltas travel as float16, as the daemon sends them by default.

To keep the run short on one core, the federation starts from a warm model (pooled training on
other frames of sites 0-4, shared by every run), each site trains on few images per round, and
the first round's honest training, identical in every run of a federation size, is done once
and restored from a checkpoint. The figure is the mean test Dice over the honest sites' test
images (frames from other patients), with the honest-only federation as the reference.

    nice -n 10 .venv/bin/python bench/bench_poison.py             # full run, one core
    nice -n 10 .venv/bin/python bench/bench_poison.py --quick     # smoke test, tiny sizes
    .venv/bin/python bench/bench_poison.py --table bench/results/poison.json   # markdown table
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fednca import aggregate as agg
from fednca.aggregate import AggregationConfig
from fednca.atomic import write_text
from fednca.config import ModelConfig, TrainConfig, preset, train_preset
from fednca.data import Dataset, concat
from fednca.model import build
from fednca.phantom import phantom_dataset
from fednca.train import Trainer, evaluate

TEST_START = 10_000  # test frames: other patients than any training frame
WARM_START = 5_000  # frames of the warm model's pooled training: neither training nor test frames
Tensors = dict[str, np.ndarray]


def _rule(method: str, *, median_norm_factor: float | None, max_weight_ratio: float | None) -> AggregationConfig:
    """Every field given, so the figures do not depend on the dataclass defaults."""
    return AggregationConfig(method=method, trim=0.2, min_trim=1 if method == "trimmed_mean" else 0, clip_norm=None,
                             median_norm_factor=median_norm_factor, max_weight_ratio=max_weight_ratio,
                             max_model_change=0.5, max_abs_weight=1e4)


RULES: dict[str, AggregationConfig] = {
    "fedavg": _rule("fedavg", median_norm_factor=None, max_weight_ratio=None),
    "fedavg_bounded": _rule("fedavg", median_norm_factor=2.0, max_weight_ratio=2.0),
    "median_bounded": _rule("median", median_norm_factor=2.0, max_weight_ratio=None),
    "trimmed_bounded": _rule("trimmed_mean", median_norm_factor=2.0, max_weight_ratio=None),
}
RULE_LABELS = {
    "fedavg": "(a) FedAvg, no bounds",
    "fedavg_bounded": "(b) FedAvg, norm 2x median, weight 2x median",
    "median_bounded": "(c) median, norm 2x median",
    "trimmed_bounded": "(d) trimmed mean 0.2, min_trim 1, norm 2x median",
}


def _mean(deltas: list[Tensors]) -> Tensors:
    return {k: np.mean([d[k] for d in deltas], axis=0, dtype=np.float64).astype(np.float32) for k in deltas[0]}


def _huge(honest: list[Tensors], samples: int) -> tuple[Tensors, float]:
    return {k: np.full_like(v, 1e30, dtype=np.float32) for k, v in honest[0].items()}, 1e9


def _flip10(honest: list[Tensors], samples: int) -> tuple[Tensors, float]:
    return {k: -10 * v for k, v in _mean(honest).items()}, 1e9


def _negsum(honest: list[Tensors], samples: int) -> tuple[Tensors, float]:
    return {k: -len(honest) * v for k, v in _mean(honest).items()}, float(samples)


ATTACKS: dict[str, Callable[[list[Tensors], int], tuple[Tensors, float]]] = {
    "huge": _huge, "flip10": _flip10, "negsum": _negsum,
}


@dataclass(frozen=True)
class Setup:
    model: ModelConfig
    train: TrainConfig
    train_images: int
    test_images: int
    warm_steps: int
    seed: int

    @property
    def steps_per_round(self) -> int:
        return self.train.local_epochs * max(1, self.train_images // self.train.batch_size)


def _delta(weights: Tensors, base: Tensors) -> Tensors:
    """What an honest site sends: local minus global, through float16 as on the wire."""
    return {k: (weights[k].astype(np.float32) - base[k]).astype(np.float16).astype(np.float32) for k in base}


def _dice(weights: Tensors, cfg: ModelConfig, tests: list[Dataset], seed: int) -> list[float]:
    model = build(cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()})
    return [evaluate(model, t, seed=seed).dice_mean for t in tests]


class Federation:
    """The data of ``n`` sites, the warm model, and the first round of honest training, done once."""

    def __init__(self, *, n: int, setup: Setup, warm: Tensors) -> None:
        self.n, self.setup, self.warm = n, setup, warm
        s = setup
        self.train = [phantom_dataset(site=i, count=s.train_images, size=s.model.input_size, seed=s.seed)
                      for i in range(n)]
        self.test = [phantom_dataset(site=i, count=s.test_images, size=s.model.input_size, seed=s.seed,
                                     start=TEST_START) for i in range(n)]
        self.first: list[tuple[bytes, Tensors]] = []
        for i in range(n):
            t = Trainer(model_cfg=s.model, train_cfg=s.train, data=self.train[i], seed=1000 + i, weights=warm)
            t.run(max_steps=s.steps_per_round)
            self.first.append((t.checkpoint(), _delta(t.weights(), warm)))

    def run(self, *, rule: AggregationConfig, poisoners: int, attack: str | None, rounds: int) -> dict:
        honest = self.n - poisoners
        trainers = [Trainer.restore(self.first[i][0], data=self.train[i])[0] for i in range(honest)]
        model, refused, reasons, started = dict(self.warm), 0, [], time.perf_counter()
        for r in range(rounds):
            if r == 0:
                deltas = [self.first[i][1] for i in range(honest)]
            else:
                deltas = []
                for t in trainers:
                    t.set_weights(model)
                    t.run(max_steps=self.setup.steps_per_round)
                    deltas.append(_delta(t.weights(), model))
            updates: list[tuple[Tensors, float]] = [(d, float(self.setup.train_images)) for d in deltas]
            if poisoners:
                assert attack is not None
                updates += [ATTACKS[attack](deltas, self.setup.train_images) for _ in range(poisoners)]
            try:
                new = agg.apply(model, agg.aggregate(updates, rule))
                reason = agg.check_model(new, model, rule)
            except agg.AggregationError as e:
                new, reason = model, f"aggregation failed: {e}"
            if reason is None:
                model = new
            else:
                refused += 1
                reasons.append(reason)
        dice = _dice(model, self.setup.model, self.test[:honest], self.setup.seed)
        return {"dice_per_site": [round(d, 4) for d in dice], "dice": round(float(np.mean(dice)), 4),
                "refused": refused, "reasons": reasons[:2], "seconds": round(time.perf_counter() - started, 1)}


def warm_model(setup: Setup) -> Tensors:
    """A model trained on pooled frames of sites 0-4 that no run trains or tests on."""
    s = setup
    pooled = concat([phantom_dataset(site=i, count=max(2, s.train_images), size=s.model.input_size, seed=s.seed,
                                     start=WARM_START) for i in range(5)])
    t = Trainer(model_cfg=s.model, train_cfg=s.train, data=pooled, seed=s.seed)
    if s.warm_steps:
        t.run(max_steps=s.warm_steps)
    return {k: v.copy() for k, v in t.weights().items()}


def table(result: dict) -> str:
    """The markdown table of a results file: Dice of the honest sites (refused rounds / rounds)."""
    rules = list(result["rules"])
    head = "| sites | rounds | poisoners | attack | " + " | ".join(RULE_LABELS.get(r, r) for r in rules) + " |"
    lines = [head, "|" + "---|" * (4 + len(rules))]
    by_key = {(x["sites"], x["poisoners"], x["attack"], x["rule"]): x for x in result["runs"]}
    start = result.get("warm_dice", {})
    for n in sorted({x["sites"] for x in result["runs"]}):
        rounds = next(x["rounds"] for x in result["runs"] if x["sites"] == n)
        if str(n) in start:
            lines.append(f"| {n} | 0 | - | warm start (no federation) | "
                         + " | ".join(f"{start[str(n)]:.3f}" for _ in rules) + " |")
        keys = sorted({(x["poisoners"], x["attack"] or "") for x in result["runs"] if x["sites"] == n})
        for p, attack in keys:
            cells = []
            for r in rules:
                x = by_key.get((n, p, attack or None, r))
                if x is None:
                    cells.append("-")
                    continue
                cell = f"{x['dice']:.3f} ({x['refused']}/{rounds})"
                ref = by_key.get((n, 0, None, r))
                if p and ref:  # the honest-only federation's Dice on the same honest sites
                    cell += f", ref {np.mean(ref['dice_per_site'][: n - p]):.3f}"
                cells.append(cell)
            label = "none (reference)" if p == 0 else attack
            lines.append(f"| {n} | {rounds} | {p} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plan(text: str) -> list[tuple[int, int]]:
    """``5:4,10:3`` -> [(5, 4), (10, 3)]: sites and rounds of each federation size."""
    return [(int(a), int(b)) for a, b in (part.split(":") for part in text.split(","))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", type=_plan, default=_plan("5:4,10:3"), help="SITES:ROUNDS,... (default 5:4,10:3)")
    p.add_argument("--poisoners", default="0,1,2", help="poisoning site counts (default 0,1,2)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"default {','.join(ATTACKS)}")
    p.add_argument("--rules", default=",".join(RULES), help=f"default {','.join(RULES)}")
    p.add_argument("--train-images", type=int, default=4, help="training images per site (default 4)")
    p.add_argument("--test-images", type=int, default=4, help="test images per site (default 4)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--nca-steps", default="20,10", help="NCA steps of stage 1 and 2 (default 20,10)")
    p.add_argument("--warm-steps", type=int, default=80, help="optimiser steps of the warm model (default 80)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--out", type=Path, default=Path("bench/results/poison.json"))
    p.add_argument("--table", type=Path, metavar="JSON", help="print the markdown table of a results file and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.quick:
        args.plan, args.poisoners, args.train_images, args.test_images = [(3, 2)], "0,1", 2, 1
        args.nca_steps, args.warm_steps = "4,2", 2
        if args.out == p.get_default("out"):
            args.out = Path("bench/results/poison-quick.json")
    torch.set_num_threads(1)
    steps = tuple(int(v) for v in args.nca_steps.split(","))
    setup = Setup(model=preset(input_size=64, steps=steps),
                  train=train_preset(batch_size=args.batch, local_epochs=args.local_epochs),
                  train_images=args.train_images, test_images=args.test_images, warm_steps=args.warm_steps,
                  seed=args.seed)
    rules = args.rules.split(",")
    attacks = args.attacks.split(",")
    counts = [int(v) for v in args.poisoners.split(",")]
    started = time.perf_counter()
    warm = warm_model(setup)
    result: dict = {
        "benchmark": "poison", "quick": args.quick, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "threads": torch.get_num_threads(), "steps_per_round": setup.steps_per_round,
        "setup": {"train_images": setup.train_images, "test_images": setup.test_images, "batch": args.batch,
                  "local_epochs": args.local_epochs, "nca_steps": list(steps), "warm_steps": args.warm_steps,
                  "seed": args.seed},
        "rules": {r: asdict(RULES[r]) for r in rules}, "attacks": attacks,
        "warm_seconds": round(time.perf_counter() - started, 1), "warm_dice": {}, "runs": [],
    }
    for n, rounds in args.plan:
        fed = Federation(n=n, setup=setup, warm=warm)
        result["warm_dice"][str(n)] = round(float(np.mean(_dice(warm, setup.model, fed.test, args.seed))), 4)
        for count in counts:
            for attack in attacks if count else [None]:
                for name in rules:
                    run = fed.run(rule=RULES[name], poisoners=count, attack=attack, rounds=rounds)
                    result["runs"].append({"sites": n, "rounds": rounds, "poisoners": count, "attack": attack,
                                           "rule": name, **run})
                    print(json.dumps(result["runs"][-1]), flush=True)
                    result["seconds"] = round(time.perf_counter() - started, 1)
                    write_text(args.out, json.dumps(result, indent=1) + "\n")
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"total {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
