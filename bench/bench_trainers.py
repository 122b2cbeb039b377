"""Training throughput and peak memory of the trainers a site can run, side by side.

Variants: the PyTorch trainer (``fednca.train.Trainer``, normal and low-memory mode), the numpy
trainer (``fednca.nptrain.Trainer``, no PyTorch imported) and the authors-style baseline
(``bench/bench_train.py --child authors``). Each measurement is its own child process, so its
peak RSS (``ru_maxrss``) is its own and includes importing its framework; the thread count is set
through the BLAS/OpenMP environment before the child starts (and ``torch.set_num_threads``).
Variants alternate within each repeat (A B C D A B C D ...), so a drift of the shared machine's
load spreads over all of them; the summary gives min / median / max over the repeats.

    nice -n 10 .venv/bin/python bench/bench_trainers.py [--repeats 3] [--iters 10] [--threads 1 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ("torch", "torch-low-memory", "numpy", "authors")


def child(variant: str, iters: int, threads: int, batch: int) -> dict:
    """Train ``iters`` steps after one warm-up step on 8 phantom images; report samples/s and RSS."""
    from fednca.config import preset, train_preset
    from fednca.phantom import phantom_dataset

    data = phantom_dataset(site=0, count=2 * batch, size=64, seed=0)
    kw = dict(model_cfg=preset(), train_cfg=train_preset(batch_size=batch), data=data, seed=0)
    if variant == "numpy":
        from fednca.nptrain import Trainer

        trainer = Trainer(**kw)
    else:
        import torch

        from fednca.train import Trainer as TorchTrainer

        torch.set_num_threads(threads)
        trainer = TorchTrainer(**kw, low_memory=variant == "torch-low-memory")
    trainer.set_weights({k: v + 0.02 for k, v in trainer.weights().items()})  # a non-zero last layer
    trainer.step()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    trainer.run(max_steps=iters)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "variant": variant,
        "samples_per_s": round(iters * batch / seconds, 2),
        # CPU seconds per sample, all threads: on a busy machine a fairer figure than samples/s
        "cpu_s_per_sample": round(cpu / (iters * batch), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_imported": "torch" in sys.modules,
    }


def measure(variant: str, iters: int, threads: int, batch: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    if variant == "authors":
        cmd = [sys.executable, str(HERE / "bench_train.py"), "--child", "authors"]
    else:
        cmd = [sys.executable, __file__, "--child", variant]
    cmd += ["--iters", str(iters), "--threads", str(threads), "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["variant"] = variant
    return result


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": round(statistics.median(values), 2), "max": max(values)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--child", choices=VARIANTS)
    args = p.parse_args()
    if args.child:
        threads = args.threads[0]
        print(json.dumps(child(args.child, args.iters, threads, args.batch)))
        return
    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for threads in args.threads:
            for variant in args.variants:
                result = measure(variant, args.iters, threads, args.batch)
                runs.setdefault(f"{variant}@{threads}", []).append(result)
                print(f"{variant}@{threads}: {result['samples_per_s']} samples/s, "
                      f"{result['peak_rss_mb']} MB", file=sys.stderr, flush=True)  # progress
    summary = {
        key: {
            "samples_per_s": spread([r["samples_per_s"] for r in rs]),
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in rs]),
            **({"cpu_s_per_sample": spread([r["cpu_s_per_sample"] for r in rs])} if "cpu_s_per_sample" in rs[0] else {}),
        }
        for key, rs in runs.items()
    }
    print(json.dumps({"batch": args.batch, "iters": args.iters, "repeats": args.repeats,
                      "threads": args.threads, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
