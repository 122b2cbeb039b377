"""``fednca segment [--model model.onnx] IMAGE... --out DIR``: masks, overlays and a quality score.

Without ``--model`` it uses the site daemon's inference model, the newest verified global model
(``$FEDNCA_STATE_DIR/inference/model.onnx``, by default under ``/var/lib/fednca``).

Runs on onnxruntime, numpy and Pillow only: PyTorch is not imported. For each image it writes
``DIR/NAME_mask.png`` (0/255, the image's own size) and ``DIR/NAME_overlay.png`` and reports the
NQM quality score; an image whose score is above ``--threshold`` is flagged, and a mask that is
empty or nearly so is flagged ``empty`` (NQM scores such a mask high too, so the flag says which
it is). The exit status is 0 whether or not images are flagged; errors (an unreadable image, a file that is not an exported
model) exit with status 2 and name the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from fednca.errors import ConfigError, FedNCAError
from fednca.segment import (
    DEFAULT_NQM_THRESHOLD, DEFAULT_PASSES, EMPTY_FOREGROUND, Segmenter, output_paths, segment_file,
)

# Where a site daemon keeps its newest verified global model (its state_dir, default /var/lib/fednca).
DEFAULT_MODEL = Path(os.environ.get("FEDNCA_STATE_DIR", "/var/lib/fednca")) / "inference" / "model.onnx"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG, any size, grey or colour")
    p.add_argument("--model", type=Path,
                   help="ONNX file written by 'fednca export' (default: the site daemon's newest global model, "
                        f"{DEFAULT_MODEL})")
    p.add_argument("--out", type=Path, required=True, help="folder for the masks and overlays (created)")
    p.add_argument("--passes", type=_positive, default=DEFAULT_PASSES,
                   help=f"stochastic passes averaged per image (default {DEFAULT_PASSES}; NQM needs 2 or more)")
    p.add_argument("--threshold", type=_score, default=DEFAULT_NQM_THRESHOLD,
                   help=f"flag an image whose NQM is above this (default {DEFAULT_NQM_THRESHOLD})")
    p.add_argument("--seed", type=int, help="seed of the fire masks (default: fresh, printed with --json)")
    p.add_argument("--threads", type=_positive, default=1, help="onnxruntime intra-op threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every image's result")


def _model_path(given: Path | None) -> Path:
    """``--model``, else the site daemon's inference model; without either, where it looked and how to
    point elsewhere."""
    if given is not None:
        return given
    if not DEFAULT_MODEL.exists():
        raise FedNCAError(
            f"no model given and none at {DEFAULT_MODEL}, where the site daemon keeps its newest verified global "
            "model (inference/model.onnx in its state folder: state_dir in daemon.yaml, FEDNCA_STATE_DIR here; "
            "it appears once the daemon has verified a round). Point to another with --model FILE.onnx "
            "(made by 'fednca export')")
    return DEFAULT_MODEL


def run(args: argparse.Namespace) -> int:
    args.model = _model_path(args.model)
    seg = Segmenter.open(args.model, threads=args.threads)
    paths = output_paths(args.images, args.out)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError("--out", f"cannot create the folder {args.out} ({e.strerror})") from None
    seed = np.random.SeedSequence().entropy if args.seed is None else args.seed
    rng = np.random.default_rng(seed)
    results = []
    for image, (mask, overlay) in zip(args.images, paths):
        r = segment_file(seg, image, mask, overlay, passes=args.passes, rng=rng, nqm_threshold=args.threshold)
        results.append(r)
        if not args.json:
            score = "NQM n/a (1 pass)" if r.nqm is None else f"NQM {r.nqm:.3f}"
            flag = "  FLAGGED: check this mask" if r.flagged else ""
            empty = "  EMPTY: the model found (next to) nothing" if "empty" in r.flags else ""
            print(f"{image}: {100 * r.foreground:.1f}% foreground, {score}{flag}{empty} -> {mask}")
    if args.json:
        print(json.dumps({
            "model": str(args.model), "model_sha256": seg.model_sha256, "preset": seg.cfg.preset,
            "input_size": seg.cfg.input_size, "passes": args.passes, "seed": seed, "nqm_threshold": args.threshold,
            "threads": args.threads, "flagged": sum(r.flagged for r in results),
            "empty": sum("empty" in r.flags for r in results),
            "images": [r.to_dict() for r in results],
        }))
    else:
        if any(r.flagged for r in results):
            print(f"{sum(r.flagged for r in results)} of {len(results)} image(s) flagged (NQM > {args.threshold})",
                  file=sys.stderr)
        if any("empty" in r.flags for r in results):
            print(f"{sum('empty' in r.flags for r in results)} of {len(results)} image(s) with an empty or near-empty "
                  f"mask (under {100 * EMPTY_FOREGROUND:g}% of the pixels)", file=sys.stderr)
    return 0
