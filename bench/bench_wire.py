"""Update decode-and-verify throughput on one core: unseal, verify, parse and check.

Opens distinct sealed updates of the default model (as the coordinator does for each message on
``updates/+``) for a fixed time and prints one JSON object; ``--out`` also writes it to a file.
The encode side (sign and seal, what a site does once per round) is measured the same way.

    .venv/bin/python bench/bench_wire.py --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import nacl

from fednca import wire
from fednca.atomic import write_text
from fednca_app.commands.wire import FEDERATION, SITE, sample


def _rate(work: Callable[[int], object], seconds: float) -> tuple[float, int]:
    """Calls per second of ``work(i)`` over at least ``seconds`` (after a short warm-up)."""
    for i in range(20):
        work(i)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            work(count)
            count += 1
    return count / elapsed, count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    p.add_argument("--updates", type=int, default=200, help="distinct updates cycled through")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    s = sample("fednca")
    updates = [s.update(dtype=args.dtype, seed=i) for i in range(args.updates)]

    def decode(i: int) -> object:
        return wire.open_update(
            updates[i % len(updates)], topic_site=SITE, coordinator_keys=[s.coordinator.box],
            registry=s.registry, federation=FEDERATION, round=1, base_sha256=s.base_sha256, shapes=s.shapes,
            max_bytes=wire.max_update_bytes(s.shapes),
        )

    delta = s.delta(seed=0)

    def encode(i: int) -> object:
        return s.update(dtype=args.dtype, delta=delta)

    decode_rate, decoded = _rate(decode, args.seconds)
    encode_rate, encoded = _rate(encode, args.seconds / 2)
    result = {
        "bench": "wire",
        "dtype": args.dtype,
        "update_bytes": len(updates[0]),
        "decode_verify_per_s": round(decode_rate, 1),
        "decode_us": round(1e6 / decode_rate, 1),
        "decoded": decoded,
        "encode_sign_seal_per_s": round(encode_rate, 1),
        "encoded": encoded,
        "cores": 1,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pynacl": nacl.__version__,
    }
    text = json.dumps(result, sort_keys=True)
    print(text)
    if args.out:
        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
