"""``fednca train``: train on one machine, on a folder dataset or on phantom sites.

Checkpoints after every chunk into ``OUT/checkpoint.safetensors``; ``--resume`` continues from it
bit-identically. Writes the model, a PNG of test overlays and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from fednca.errors import ConfigError


def _steps(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 40,20, got {text!r}") from None
    return a, b


def _sites(text: str) -> list[int]:
    try:
        if "-" in text:
            lo, hi = (int(v) for v in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sites like 0-4 or 0,2,3, got {text!r}") from None


def configure(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="folder of images/ and masks/")
    src.add_argument("--phantom", type=_sites, metavar="SITES", help="phantom sites, e.g. 0-4")
    p.add_argument("--count", type=int, default=160, help="phantom images per site (default 160)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="fednca", choices=["fednca", "mednca"])
    p.add_argument("--size", type=int, help="input side in pixels (preset default)")
    p.add_argument("--nca-steps", type=_steps, help="NCA steps of stage 1 and 2, e.g. 40,20")
    p.add_argument("--batch", type=int, help="batch size (preset default 4)")
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--chunk-steps", type=int, default=20, help="optimiser steps between checkpoints")
    p.add_argument("--low-memory", action="store_true", help="recompute steps in the backward pass")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=1, help="stochastic passes averaged at the final test")
    p.add_argument("--skip-bad", action="store_true", help="skip broken image/mask pairs and count them")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")


def _load(args, size: int):
    from fednca.data import concat, load_folder, split

    if args.data is not None:
        data, skipped = load_folder(args.data, size=size, skip_bad=args.skip_bad)
        if skipped:
            print(f"skipped {skipped} bad image/mask pair(s) in {args.data}", file=sys.stderr)
    else:
        from fednca.phantom import phantom_dataset

        data = concat([phantom_dataset(site=s, count=args.count, size=size, seed=args.seed) for s in args.phantom])
    return split(data, test_fraction=args.test_fraction, seed=args.seed)


class Progress:
    """A bar on a terminal, plain lines in a log."""

    def __init__(self, total: int) -> None:
        self.total, self.tty = total, sys.stderr.isatty()

    def update(self, done: int, text: str) -> None:
        if self.tty:
            filled = int(30 * done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {text}   ")
            sys.stderr.flush()

    def line(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + " " * 100 + "\r")
        print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from fednca import atomic, modelfile
    from fednca.config import preset, train_preset
    from fednca.data import to_uint8
    from fednca.model import count_parameters
    from ..plots import line_chart, overlay_grid
    from fednca.train import Trainer, evaluate

    if args.epochs <= 0 or args.chunk_steps <= 0 or args.passes <= 0:
        raise ConfigError("--epochs/--chunk-steps/--passes", "must be positive")
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("input_size", args.size), ("steps", args.nca_steps)) if v is not None}
    model_cfg = preset(args.preset, **overrides)
    train_overrides = {k: v for k, v in (("batch_size", args.batch), ("lr", args.lr)) if v is not None}
    train_cfg = train_preset(args.preset, **train_overrides)
    train, test = _load(args, model_cfg.input_size)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.safetensors"

    if args.resume and ckpt.exists():
        trainer, state = Trainer.restore(ckpt.read_bytes(), data=train)
        print(f"resumed at epoch {trainer.epoch}, step {trainer.steps}", file=sys.stderr)
    else:
        trainer = Trainer(model_cfg=model_cfg, train_cfg=train_cfg, data=train, seed=args.seed,
                          low_memory=args.low_memory)
        state = {"loss": [], "dice": [], "loss_sum": 0.0, "loss_n": 0, "train_seconds": 0.0}
    per_epoch = trainer.batches_per_epoch
    progress = Progress(args.epochs * per_epoch)
    while trainer.epoch < args.epochs:
        epoch = trainer.epoch
        chunk = trainer.run(max_steps=min(args.chunk_steps, per_epoch - trainer.cursor))
        state["loss_sum"] += chunk.loss * chunk.steps
        state["loss_n"] += chunk.steps
        state["train_seconds"] += chunk.seconds
        if trainer.epoch != epoch:  # an epoch just ended
            dice_now = evaluate(trainer.model, test, seed=args.seed).dice_mean
            state["loss"].append(state["loss_sum"] / max(1, state["loss_n"]))
            state["dice"].append(dice_now)
            state["loss_sum"], state["loss_n"] = 0.0, 0
            progress.line(f"epoch {epoch + 1}/{args.epochs} loss {state['loss'][-1]:.4f} test dice {dice_now:.3f}")
        atomic.write_bytes(ckpt, trainer.checkpoint(**state))
        progress.update(trainer.steps, f"loss {chunk.loss:.4f}")

    result = evaluate(trainer.model, test, passes=args.passes, seed=args.seed)
    modelfile.save(args.out, trainer.weights(), model_cfg, train=train_cfg.to_dict(),
                   test_dice=result.dice_mean, epochs=args.epochs)
    k = min(8, len(test))
    overlay_grid(args.out / "test-overlays.png", to_uint8(test.images[:k, 0]), test.masks[:k, 0] > 0.5,
                 result.probabilities[:k, 0] > 0.5, captions=[f"dice {d:.2f}" for d in result.dice[:k]])
    line_chart(args.out / "curves.png", {"train loss": state["loss"], "test dice": state["dice"]},
               title="training", xlabel="epoch", ylabel="value")
    samples = trainer.steps * train_cfg.batch_size
    summary = {
        "params": count_parameters(trainer.model),
        "train_images": len(train),
        "test_images": len(test),
        "epochs": args.epochs,
        "dice_mean": round(result.dice_mean, 4),
        "dice_std": round(result.dice_std, 4),
        "nqm_mean": None if result.nqm is None else round(float(result.nqm.mean()), 4),
        "seconds": round(state["train_seconds"], 2),
        "samples_per_s": round(samples / max(state["train_seconds"], 1e-9), 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "low_memory": trainer.low_memory,
        "out": str(args.out),
    }
    print(f"test dice {summary['dice_mean']:.3f} ± {summary['dice_std']:.3f} on {len(test)} images; "
          f"{summary['samples_per_s']} samples/s; model in {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0
