"""Run every benchmark once, one after another, and write their JSON into bench/results/.

    .venv/bin/python bench/run_all.py [--only NAME ...]

Each benchmark also runs alone (see its docstring). Figures quoted in BENCHMARKS.md come from
these files; run on an otherwise idle machine, since timings share its cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "phantom_threshold": ["phantom_threshold.py"],
    "train": ["bench_train.py", "--iters", "15", "--threads", "2"],
    "wire": ["bench_wire.py", "--seconds", "3"],
    "segment": ["bench_segment.py", "--images", "20"],
    "coordinator": ["bench_coordinator.py"],
    "bridge": ["bench_bridge.py", "--sites", "1000", "--receipts"],
    "daemon": ["bench_daemon.py", "--seconds", "20"],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    args = p.parse_args()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    failed = []
    for name in args.only:
        start = time.monotonic()
        done = subprocess.run([sys.executable, str(HERE / BENCHES[name][0]), *BENCHES[name][1:]],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            failed.append(name)
            continue
        text = done.stdout.strip()
        start_json = text.find("{")
        result = json.loads(text[start_json:]) if start_json >= 0 else {"output": text}
        record = {"bench": name, "argv": BENCHES[name], "machine": platform.machine(),
                  "python": platform.python_version(), "seconds": round(time.monotonic() - start, 1),
                  "result": result}
        (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"{name}: {record['seconds']} s -> bench/results/{name}.json", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
