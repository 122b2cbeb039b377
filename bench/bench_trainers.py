"""Training throughput and peak memory of the trainers a site can run, side by side, in one run.

Variants: the PyTorch trainer (``fednca.train.Trainer``, normal and low-memory mode), the numpy
trainer (``fednca.nptrain.Trainer``, no PyTorch imported) and the authors-style stand-in
(``bench/authors_baseline.py``: the published code's structure, the same weights, BCE and Adam).
All four train on the same phantom images at the same batch size. Each measurement is a fresh
child process, so its peak RSS (``VmHWM``) is its own and includes importing its framework; the
thread count is set through the BLAS/OpenMP environment before the child starts (and
``torch.set_num_threads``). Variants alternate within each repeat (A B C D A B C D ...), so a
drift of the shared machine's load spreads over all of them; the summary gives min / median /
max over the repeats, and the ratios are taken per repeat (neighbours in time) before their
median. CPU seconds per sample (all threads) sits beside samples/s: on a busy machine it moves
less than wall time.

    nice -n 10 .venv/bin/python bench/bench_trainers.py [--repeats 3] [--iters 6] [--threads 1 2] \
        [--out bench/results/trainers.json]

Prints one JSON object (and writes it to ``--out``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("torch", "torch-low-memory", "numpy", "authors")
SITE_RSS_GOAL_MB = 200.0  # the site trainer's peak RSS
SPEED_GOAL = 1.3  # the site trainer's samples/s against the stand-in's


def peak_rss_mb() -> float:
    """The process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc/self/status")


def _authors_trainer(data: Any, batch: int) -> Any:
    """A step function of the stand-in: the fednca model's weights (as the trainers get them)
    loaded into bench/authors_baseline.py's model, trained with BCE and Adam on ``data``."""
    import torch

    sys.path.insert(0, str(HERE))
    from authors_baseline import AuthorsStyleNCA

    from fednca.config import preset
    from fednca.model import build

    cfg = preset()
    ours = build(cfg, seed=0)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.02)  # as the trainers' set_weights below: a non-zero last layer
    model = AuthorsStyleNCA(cfg).load_from(ours)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, masks = torch.from_numpy(data.images), torch.from_numpy(data.masks)
    cursor = [0]

    def step() -> None:
        i = cursor[0] % (len(images) // batch) * batch
        cursor[0] += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images[i : i + batch]),
                                                                    masks[i : i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()

    class Stepper:
        def step(self) -> None:
            step()

        def run(self, *, max_steps: int) -> None:
            for _ in range(max_steps):
                step()

    return Stepper()


def child(variant: str, iters: int, threads: int, batch: int) -> dict:
    """Train ``iters`` steps after one warm-up step on 2 batches of phantom images; report
    samples/s, CPU seconds per sample and peak RSS."""
    from fednca.config import preset, train_preset
    from fednca.phantom import phantom_dataset

    data = phantom_dataset(site=0, count=2 * batch, size=64, seed=0)
    kw = dict(model_cfg=preset(), train_cfg=train_preset(batch_size=batch), data=data, seed=0)
    if variant == "numpy":
        from fednca.nptrain import Trainer

        trainer: Any = Trainer(**kw)
    else:
        import torch

        torch.set_num_threads(threads)
        if variant == "authors":
            trainer = _authors_trainer(data, batch)
        else:
            from fednca.train import Trainer as TorchTrainer

            trainer = TorchTrainer(**kw, low_memory=variant == "torch-low-memory")
    if variant != "authors":
        trainer.set_weights({k: v + 0.02 for k, v in trainer.weights().items()})  # a non-zero last layer
    trainer.step()  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    trainer.run(max_steps=iters)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "variant": variant,
        "samples_per_s": round(iters * batch / seconds, 2),
        "cpu_s_per_sample": round(cpu / (iters * batch), 3),
        "peak_rss_mb": peak_rss_mb(),
        "torch_imported": "torch" in sys.modules,
    }


def measure(variant: str, iters: int, threads: int, batch: int) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(threads)
    cmd = [sys.executable, __file__, "--child", variant,
           "--iters", str(iters), "--threads", str(threads), "--batch", str(batch)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": round(statistics.median(values), 2), "max": max(values)}


def ratios(runs: dict[str, list[dict]], threads: int, top: str, bottom: str) -> dict | None:
    """``top``'s samples/s over ``bottom``'s, per repeat (measured next to each other), spread."""
    a, b = runs.get(f"{top}@{threads}"), runs.get(f"{bottom}@{threads}")
    if not a or not b:
        return None
    return spread([round(x["samples_per_s"] / y["samples_per_s"], 2) for x, y in zip(a, b)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--child", choices=VARIANTS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.iters, args.threads[0], args.batch)))
        return
    runs: dict[str, list[dict]] = {}
    for repeat in range(args.repeats):
        for threads in args.threads:
            for variant in args.variants:
                result = measure(variant, args.iters, threads, args.batch)
                runs.setdefault(f"{variant}@{threads}", []).append(result)
                print(f"[{repeat + 1}/{args.repeats}] {variant}@{threads}: {result['samples_per_s']} samples/s, "
                      f"{result['cpu_s_per_sample']} CPU s/sample, {result['peak_rss_mb']} MB",
                      file=sys.stderr, flush=True)
    summary = {
        key: {field: spread([r[field] for r in rs]) for field in ("samples_per_s", "cpu_s_per_sample", "peak_rss_mb")}
        for key, rs in runs.items()
    }
    compared = {}
    for threads in args.threads:
        pairs = {"numpy/authors": ("numpy", "authors"), "numpy/torch-low-memory": ("numpy", "torch-low-memory"),
                 "torch/authors": ("torch", "authors"), "torch-low-memory/authors": ("torch-low-memory", "authors"),
                 "torch-low-memory/torch": ("torch-low-memory", "torch")}
        compared[f"{threads} thread(s)"] = {name: r for name, (a, b) in pairs.items()
                                           if (r := ratios(runs, threads, a, b)) is not None}
    goals = {}
    if any(k.startswith("numpy@") for k in runs):
        worst_rss = max(r["peak_rss_mb"] for k, rs in runs.items() if k.startswith("numpy@") for r in rs)
        goals["numpy_peak_rss_mb_max"] = worst_rss
        goals["numpy_peak_rss_within_goal"] = worst_rss <= SITE_RSS_GOAL_MB
        speed = {t: c["numpy/authors"]["median"] for t, c in compared.items() if "numpy/authors" in c}
        if speed:
            goals["numpy_over_authors_median"] = speed
            goals["numpy_speed_within_goal"] = all(v >= SPEED_GOAL for v in speed.values())
    report = {"batch": args.batch, "iters": args.iters, "repeats": args.repeats, "threads": args.threads,
              "machine_load_1min": os.getloadavg()[0], "summary": summary, "ratios": compared,
              "goals": {"site_rss_mb": SITE_RSS_GOAL_MB, "speed_over_authors": SPEED_GOAL, **goals},
              "runs": runs}
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
