"""``fednca export MODEL --out model.onnx``: the trained model as one ONNX graph for ``fednca segment``.

MODEL is a model folder (``model.safetensors`` + ``model.json``) or its ``model.safetensors``.
The graph is checked with onnx.checker and, unless ``--no-verify``, run by onnxruntime next to
PyTorch on the same input and masks before the file is written. Without PyTorch installed (a
site), :mod:`fednca.onnx_build` writes the same graph and checks it against the numpy model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help="model folder or its model.safetensors")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-against-PyTorch check")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from fednca import modelfile

    start = time.perf_counter()
    reference = "PyTorch"
    try:
        import torch  # PyTorch's exporter where it is installed: it traces the code that trains
    except ImportError:  # a site installed without it: the same graph, written from the weights
        from fednca.onnx_build import export as export_onnx

        reference = "the numpy model"
    else:
        from fednca.onnx_export import export_onnx

        torch.set_num_threads(1)
    cfg, weights, _ = modelfile.load(args.model)
    done = export_onnx(weights, cfg, args.out, verify=not args.no_verify)
    result = {
        "model": str(args.model), "onnx": str(done.path), "bytes": done.size, "model_sha256": done.model_sha256,
        "preset": cfg.preset, "input_size": cfg.input_size, "steps": list(cfg.steps),
        "max_error": done.max_error, "seconds": round(time.perf_counter() - start, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        check = "not verified" if done.max_error is None else f"matches {reference} to {done.max_error:.1e}"
        print(f"wrote {done.path} ({done.size:,} bytes, {cfg.preset} {cfg.input_size}x{cfg.input_size}, "
              f"model {done.model_sha256[:12]}, {check}) in {result['seconds']:.1f} s")
    return 0
