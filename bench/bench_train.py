"""Training throughput and peak memory: this implementation against the authors-style baseline.

Each variant trains in its own child process (so peak RSS is its own), on the same batch of 4
phantom-like 64x64 images, with the same number of torch threads; then one check in this process
that both give the same output for the same weights, input and fire masks.

    .venv/bin/python bench/bench_train.py [--iters 15] [--threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from authors_baseline import AuthorsStyleNCA  # noqa: E402

from fednca.config import preset  # noqa: E402
from fednca.model import build  # noqa: E402

VARIANTS = ("authors", "fednca", "fednca-low-memory")


def child(variant: str, iters: int, threads: int, batch: int) -> dict:
    torch.set_num_threads(threads)
    cfg = preset()
    ours = build(cfg, seed=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model = AuthorsStyleNCA(cfg).load_from(ours) if variant == "authors" else ours
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 64, 64, generator=gen) * 2 - 1
    y = (torch.rand(batch, 1, 64, 64, generator=gen) > 0.7).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        if variant == "authors":
            logits = model(x)
        else:
            logits = model(x, generator=gen, low_memory=variant.endswith("low-memory"))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "samples_per_s": round(iters * batch / seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def same_outputs() -> float:
    """Largest difference between the two implementations for identical weights, input and masks."""
    cfg = preset()
    ours = build(cfg, seed=1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theirs = AuthorsStyleNCA(cfg).load_from(ours)
    g_theirs = torch.Generator().manual_seed(7)
    for nca in theirs.backbone_ncas:  # the masks our model draws, in the same order
        nca.draw_mask = lambda shape: (torch.rand(shape, generator=g_theirs) < cfg.fire_rate).float()
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    a = ours(x, generator=torch.Generator().manual_seed(7))
    b = theirs(x)
    return float((a - b).abs().max())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--child", choices=VARIANTS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters, args.threads, args.batch)))
        return
    results = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--iters", str(args.iters),
                              "--threads", str(args.threads), "--batch", str(args.batch)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["authors"]["samples_per_s"]
    print(json.dumps({
        "batch": args.batch,
        "threads": args.threads,
        "iters": args.iters,
        "results": results,
        "speedup": round(results["fednca"]["samples_per_s"] / base, 2),
        "speedup_low_memory": round(results["fednca-low-memory"]["samples_per_s"] / base, 2),
        "max_abs_output_difference": same_outputs(),
    }, indent=2))


if __name__ == "__main__":
    main()
