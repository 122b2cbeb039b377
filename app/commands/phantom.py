"""``fednca phantom``: write a phantom ultrasound dataset folder for one site.

The folder holds ``images/`` and ``masks/`` PNGs named ``s{site}p{patient:03d}_{frame:03d}.png``
(several frames per phantom patient, so patient-level splits work), ready for ``fednca train`` or
a site's daemon.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fednca.data import save_folder
from fednca.errors import ConfigError
from fednca.phantom import FRAMES_PER_PATIENT, frame_name, generate, site_shift


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", type=int, required=True, help="site number (0..4 are the documented sites)")
    parser.add_argument("--count", type=int, required=True, help="number of frames to write")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (created if missing)")
    parser.add_argument("--size", type=int, default=64, help="side of the square images in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the phantom population (default 0)")
    parser.add_argument("--start", type=int, default=0, help="index of the first frame (default 0)")


def run(args: argparse.Namespace) -> int:
    if args.count <= 0:
        raise ConfigError("--count", f"must be a positive integer, got {args.count}")
    if args.size < 8:
        raise ConfigError("--size", f"must be at least 8, got {args.size}")
    if args.start < 0:
        raise ConfigError("--start", f"must be 0 or more, got {args.start}")
    indices = range(args.start, args.start + args.count)
    frames = (
        (frame_name(args.site, i), *generate(site=args.site, index=i, size=args.size, seed=args.seed))
        for i in indices
    )
    written = save_folder(frames, args.out)
    patients = len({i // FRAMES_PER_PATIENT for i in indices})
    shift = site_shift(args.site)
    print(f"wrote {len(written)} image/mask pairs of site {args.site} ({patients} patients, "
          f"{args.size}x{args.size}, seed {args.seed}) to {args.out}/images and {args.out}/masks")
    print(f"site look: {shift}")
    return 0
