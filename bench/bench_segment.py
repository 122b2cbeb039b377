"""Inference latency and peak memory: `fednca segment` on onnxruntime against PyTorch eager.

Both segment the same 64x64 phantom images, each with ``--passes`` stochastic passes (each a
batch of one, as `fednca segment` runs them), on one thread, each in its own child process so
that its peak RSS is its own: the onnxruntime child is the real `fednca segment` command, the
PyTorch child runs the same file pipeline (:func:`fednca.segment.segment_file`) with the model
in eager mode. Latency is the model passes of one image (decoding and writing excluded), the
median over the images.

With ``--layouts`` it also compares, in this process on one thread, the graph layouts one could
export: the Scan graph that `fednca export` writes, every step unrolled by the exporter, and a
Python loop over one-step sessions, each running the passes one by one; and the Scan graph with
the passes as one batch.

    .venv/bin/python bench/bench_segment.py [--images 20] [--passes 10] [--model FOLDER] [--layouts]
    .venv/bin/python bench/bench_segment.py --model TRAINED_FOLDER --images 80 --nqm

The second form also tabulates, for a trained model, how the NQM score tracks Dice on held-out
phantom frames and what each flag threshold catches (the basis of the default threshold).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` (which prints one JSON object last) and add its peak RSS and wall time."""
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["wall_s"] = round(time.perf_counter() - start, 3)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    return report


def torch_child(model: Path, images: list[Path], out: Path, passes: int) -> dict:
    """`fednca segment`'s pipeline with the PyTorch model instead of the ONNX session."""
    import torch

    from fednca import modelfile
    from fednca.model import build
    from fednca.segment import draw_masks, output_paths, segment_file

    torch.set_num_threads(1)
    cfg, weights, _ = modelfile.load(model)
    net = build(cfg)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    net.eval()

    class Eager:
        def __init__(self) -> None:
            self.cfg = cfg

        @torch.no_grad()
        def passes(self, image: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
            x = torch.from_numpy(image.astype(np.float32))[None, None]
            out = []
            for _ in range(n):
                fire1, fire2 = (torch.from_numpy(m) for m in draw_masks(cfg, 1, rng, side=image.shape[-1]))
                out.append(torch.sigmoid(net(x, masks=(fire1, fire2)))[0, 0].numpy())
            return np.stack(out)

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    results = [segment_file(Eager(), i, m, o, passes=passes, rng=rng, nqm_threshold=0.1)
               for i, (m, o) in zip(images, output_paths(images, out))]
    return {"images": [r.to_dict() for r in results]}


def layouts(model_dir: Path, onnx_path: Path, passes: int, repeats: int) -> dict:
    """Export time and latency per image of three graph layouts, interleaved, one thread each."""
    import onnxruntime as ort
    import torch

    from fednca import modelfile
    from fednca.model import build
    from fednca.onnx_export import _quiet_exporter, export_onnx
    from fednca.segment import draw_masks

    torch.set_num_threads(1)
    cfg, weights, _ = modelfile.load(model_dir)
    net = build(cfg)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    net.eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def session(data: bytes) -> ort.InferenceSession:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def export(module: torch.nn.Module, example: tuple, names: list[str]) -> tuple[bytes, float]:
        start = time.perf_counter()
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, example, dynamo=True, input_names=names, verbose=False, report=False)
        return program.model_proto.SerializeToString(), time.perf_counter() - start

    s, p = cfg.input_size, cfg.pool
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (passes, 1, s, s)).astype(np.float32)
    masks = draw_masks(cfg, passes, rng)
    start = time.perf_counter()
    export_onnx(weights, cfg, onnx_path.with_suffix(".again.onnx"), verify=False)
    seconds = {"scan": time.perf_counter() - start}
    scan = session(onnx_path.read_bytes())

    class Unrolled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, fire1: torch.Tensor, fire2: torch.Tensor) -> torch.Tensor:
            return self.net(x, masks=(fire1, fire2))

    def inputs(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pass i alone, a batch of one
        return image[i : i + 1], masks[0][:, i : i + 1], masks[1][:, i : i + 1]

    example = tuple(map(torch.from_numpy, inputs(0)))
    data, seconds["unrolled"] = export(Unrolled(), example, ["image", "fire1", "fire2"])
    unrolled = session(data)
    steps = []
    seconds["step_loop"] = 0.0
    for nca, side in ((net.stage1, s // p), (net.stage2, s)):
        state = torch.zeros(1, cfg.channels, side, side)
        data, took = export(nca, (state, torch.ones(1, 1, side, side)), ["state", "fire"])
        seconds["step_loop"] += took
        steps.append(session(data))

    def step_loop(x: np.ndarray, fire1: np.ndarray, fire2: np.ndarray) -> np.ndarray:
        b = len(x)
        small = x.reshape(b, 1, s // p, p, s // p, p).mean((3, 5))
        state = np.concatenate([small, np.zeros((b, cfg.channels - 1, s // p, s // p), np.float32)], 1)
        for f in fire1:
            state = steps[0].run(None, {"state": state, "fire": f.astype(np.float32)})[0]
        state = np.concatenate([x, state[:, 1:].repeat(p, 2).repeat(p, 3)], 1)
        for f in fire2:
            state = steps[1].run(None, {"state": state, "fire": f.astype(np.float32)})[0]
        return state[:, 1:2]

    def by_pass(call):  # noqa: ANN001, ANN202
        return lambda: [call(*inputs(i)) for i in range(passes)]

    def scan_call(*arrays: np.ndarray) -> list:
        return scan.run(None, dict(zip(("image", "fire1", "fire2"), arrays)))

    names = [i.name for i in unrolled.get_inputs()]
    runs = {
        "scan": by_pass(scan_call),
        "scan_passes_batched": lambda: scan_call(image, *masks),
        "unrolled": by_pass(lambda *arrays: unrolled.run(None, dict(zip(names, arrays)))),
        "step_loop": by_pass(step_loop),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"ms_per_image": round(1000 * statistics.median(t), 1),
               "export_s": round(seconds[name], 2) if name in seconds else None}
        for name, t in times.items()
    }


def nqm_table(results: list[dict], truth: dict[str, np.ndarray], thresholds=(0.1, 0.15, 0.2, 0.25, 0.3)) -> dict:
    """How NQM tracks Dice: per site, their correlation, and what each flag threshold would catch."""
    from fednca.metrics import dice

    rows = []  # (group, nqm, dice or None)
    for r in results:
        name = Path(r["image"]).name
        with Image.open(r["mask"]) as mask:
            pred = np.asarray(mask) > 0
        score = float(dice(pred[None], truth[name][None])[0]) if name in truth else None
        rows.append((name.split("_")[0], r["nqm"], score))
    scored = np.array([(q, d) for _, q, d in rows if d is not None])
    groups = {}
    for g in sorted({g for g, _, _ in rows}):
        q = [v for h, v, _ in rows if h == g]
        d = [v for h, _, v in rows if h == g and v is not None]
        groups[g] = {"images": len(q), "nqm_median": round(float(np.median(q)), 3),
                     "dice_mean": round(float(np.mean(d)), 3) if d else None}
    table = {}
    for t in thresholds:
        flagged = scored[:, 0] > t
        table[str(t)] = {
            "phantom_flagged": f"{int(flagged.sum())}/{len(scored)}",
            "dice_flagged": round(float(scored[flagged, 1].mean()), 3) if flagged.any() else None,
            "dice_kept": round(float(scored[~flagged, 1].mean()), 3) if (~flagged).any() else None,
            "other_flagged": f"{sum(q > t for _, q, d in rows if d is None)}/{sum(d is None for *_, d in rows)}",
        }
    return {"correlation_nqm_dice": round(float(np.corrcoef(scored.T)[0, 1]), 3), "groups": groups,
            "thresholds": table}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--model", type=Path, help="a trained model folder (default: the default config, random weights)")
    p.add_argument("--layouts", action="store_true", help="also compare graph layouts")
    p.add_argument("--nqm", action="store_true",
                   help="with a trained --model: add noise and blank images and tabulate NQM against Dice")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per layout")
    p.add_argument("--torch-child", nargs="+", type=Path, metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_child:
        print(json.dumps(torch_child(args.torch_child[0], args.torch_child[1:], args.out, args.passes)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.nqm and args.model is None:
            raise SystemExit("--nqm needs a trained --model")
        model_dir, onnx_path, images, truth = prepare(root, args.model, args.images, others=args.nqm)
        common = ["--passes", str(args.passes)]
        results = {}
        for name, cmd in (
            ("onnxruntime", [sys.executable, "-m", "fednca_app.cli", "segment", "--model", str(onnx_path),
                             *map(str, images), "--out", str(root / "ort"), "--json", "--threads", "1",
                             "--seed", "0", *common]),
            ("pytorch", [sys.executable, __file__, "--torch-child", str(model_dir), *map(str, images),
                         "--out", str(root / "torch"), *common]),
        ):
            # A fresh parent per child, so that RUSAGE_CHILDREN holds that child's peak alone.
            wrapper = [sys.executable, "-c", f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                       "from bench_segment import measure; print(json.dumps(measure(sys.argv[1:])))", *cmd]
            report = json.loads(subprocess.run(wrapper, capture_output=True, text=True, check=True).stdout)
            if name == "onnxruntime" and args.nqm:
                calibration = nqm_table(report["images"], truth)
            latency = [r["seconds"] for r in report["images"]]
            results[name] = {"ms_per_image": round(1000 * statistics.median(latency), 1),
                             "peak_rss_mb": report["peak_rss_mb"], "wall_s": report["wall_s"]}
        summary = {
            "images": args.images, "side": 64, "passes": args.passes, "threads": 1, "results": results,
            "speedup": round(results["pytorch"]["ms_per_image"] / results["onnxruntime"]["ms_per_image"], 2),
            "goal_met": results["onnxruntime"]["peak_rss_mb"] <= 120
            and results["pytorch"]["ms_per_image"] >= 2 * results["onnxruntime"]["ms_per_image"],
        }
        if args.layouts:
            summary["layouts"] = layouts(model_dir, onnx_path, args.passes, args.repeats)
        if args.nqm:
            summary["nqm"] = calibration
        print(json.dumps(summary, indent=2))


def prepare(
    root: Path, model: Path | None, count: int, *, others: bool = False
) -> tuple[Path, Path, list[Path], dict[str, np.ndarray]]:
    """A model folder (given, or the default config with perturbed weights), its export, and PNGs:
    ``count`` phantom frames from five sites with their true masks by file name (frames no
    training run of seed 0 sees), and with ``others`` six noise and six blank images too."""
    import torch

    from fednca import modelfile
    from fednca.config import preset
    from fednca.model import build, tensors
    from fednca.onnx_export import export_onnx
    from fednca.phantom import generate

    if model is None:
        cfg = preset()
        net = build(cfg, seed=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in net.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=g))
        model = modelfile.save(root / "model", {k: v.numpy() for k, v in tensors(net).items()}, cfg)
    cfg, weights, _ = modelfile.load(model)
    if cfg.input_size != 64:
        raise SystemExit(f"{model}: this benchmark is for 64x64 models, got {cfg.input_size}")
    onnx_path = root / "model.onnx"
    export_onnx(weights, cfg, onnx_path)
    folder = root / "images"
    folder.mkdir()
    pictures, truth = {}, {}
    for i in range(count):
        name = f"site{i % 5}_{i:03d}.png"
        pictures[name], truth[name] = generate(site=i % 5, index=1000 + i, size=64, seed=7)
    rng = np.random.default_rng(0)
    for i in range(6 if others else 0):
        pictures[f"noise_{i}.png"] = (rng.random((64, 64)) * 255).astype(np.uint8)
        pictures[f"blank_{i}.png"] = np.full((64, 64), 40 * i, np.uint8)
    for name, pixels in pictures.items():
        Image.fromarray(pixels).save(folder / name)
    return model, onnx_path, [folder / name for name in pictures], truth


if __name__ == "__main__":
    main()
