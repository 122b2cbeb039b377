"""A site daemon and its trainer child under a board's memory, one round against a real coordinator.

A cgroup v1 memory group with ``memory.limit_in_bytes`` (512M by default: a Raspberry Pi Zero 2 W)
holds ``fednca daemon`` and, since children inherit their parent's group, the trainer child it
starts; mosquitto and ``fednca coordinator run`` stay outside. The federation is made as an
operator makes one (:func:`fednca_app.harness.set_up`: ``coordinator init``, ``enroll``, the
site's keys and daemon YAML) with the real model (the ``fednca`` preset, 64x64 images, 40 + 20
NCA steps) at batch 4; the site trains one local epoch on ``--images`` phantom images, then
submits. The round must end with the site's update accepted and the model aggregated.

Recorded: the group's ``memory.max_usage_in_bytes`` (everything charged to it: both processes'
resident memory and the page cache of the files they read), ``memory.failcnt`` (how often the
limit was hit and reclaim had to run), whether the kernel's OOM killer fired, and the peak
resident set (``VmHWM``) of each process in the group, read every 0.1 s while it lives.

    .venv/bin/python bench/board_memory.py [--limit 512M] [--trainer numpy] [--images 8] \
        [--out bench/results/board_memory.json]

Needs root and a writable cgroup v1 memory hierarchy (``/sys/fs/cgroup/memory``) and mosquitto.
Prints one JSON object; exits 1 when the round did not accept the site's update.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from benchlib import first_round

from fednca.config import preset, train_preset
from fednca_app import harness
from fednca_broker.store import RoundStore

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
ROUND_TIMEOUT_S = 600.0  # a bound: one round of 2 steps takes seconds here


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


class MemoryGroup:
    """A cgroup v1 memory group with a limit; :meth:`wrapper` runs a program inside it."""

    def __init__(self, *, name: str, limit_bytes: int) -> None:
        self.path = CGROUP_ROOT / name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit_bytes = int((self.path / "memory.limit_in_bytes").read_text())

    def wrapper(self) -> tuple[str, ...]:
        """argv prefix: the shell puts itself into the group, then becomes the program."""
        return ("/bin/sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh")

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def pids(self) -> list[int]:
        return [int(p) for p in self.read("cgroup.procs").split()]

    def figures(self) -> dict[str, Any]:
        stat = dict(line.split() for line in self.read("memory.stat").splitlines())
        oom = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return {
            "limit_mb": round(self.limit_bytes / 2**20, 1),
            "max_usage_mb": round(int(self.read("memory.max_usage_in_bytes")) / 2**20, 1),
            "failcnt": int(self.read("memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
            "end_rss_mb": round(int(stat["total_rss"]) / 2**20, 1),
            "end_cache_mb": round(int(stat["total_cache"]) / 2**20, 1),
        }

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.path.rmdir()


class PeakWatcher:
    """Every 0.1 s, the VmHWM of each process in a group, keyed by its command line."""

    def __init__(self, *, group: MemoryGroup) -> None:
        self.group = group
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for pid in self.group.pids():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                except OSError:
                    continue  # exited meanwhile
                kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
                if kb > self.peaks.get(pid, ("", 0))[1]:
                    self.peaks[pid] = (cmd, kb)

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(2)
        role = lambda cmd: "trainer" if "fednca_daemon.worker" in cmd else "daemon" if " daemon " in f"{cmd} " else cmd  # noqa: E731
        return [{"role": role(cmd), "pid": pid, "peak_rss_mb": round(kb / 1024, 1)}
                for pid, (cmd, kb) in sorted(self.peaks.items())]


def run(*, limit: str, trainer: str | None, images: int, root: Path) -> dict[str, Any]:
    fed = harness.set_up(root / "work", federation="board", sites=1, rounds=1, quorum=1,
                         url=f"mqtt://127.0.0.1:{harness.free_port()}", model=preset(),
                         train=train_preset(batch_size=4, local_epochs=1), grace=1.0, train_images=images,
                         chunk_s=30.0, telemetry_s=5.0)
    site = fed.sites[0]
    cfg = yaml.safe_load(site.config.read_text())
    cfg["training"].pop("low_memory")  # the daemon's default, as a site's YAML would leave it
    if trainer is not None:  # the daemon's own default otherwise
        cfg["training"]["trainer"] = trainer
    site.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = RoundStore(root=fed.config().store_root, federation="board")
    parties = harness.ProcessParties(federation=fed, log_dir=root / "logs")
    group = MemoryGroup(name=f"fednca-board-{os.getpid()}", limit_bytes=parse_size(limit))
    watcher: PeakWatcher | None = None
    try:
        parties.start_broker()
        parties.start_coordinator()
        watcher = PeakWatcher(group=group)
        start = time.monotonic()
        parties.start_site(site.name, wrapper=group.wrapper())
        accepted, aggregated = first_round(store, parties, timeout_s=ROUND_TIMEOUT_S, poll_s=0.2)
        seconds = time.monotonic() - start
        figures = group.figures()
        processes = watcher.stop()
        failure = parties.failure()
        return {
            "trainer": trainer or "daemon default",
            "model": "fednca preset, 64x64, steps 40+20, batch 4",
            "images": images,
            "memory": figures,
            "processes": processes,
            "round_seconds": round(seconds, 1),
            "update_accepted": bool(accepted),
            "samples": accepted.get("samples") if accepted else None,
            "round_aggregated": bool(aggregated),
            "failure": failure,
            "site_log_tail": parties.log(site.name)[-1500:] if not accepted else "",
        }
    finally:
        if watcher is not None:
            watcher.stop()
        parties.close()
        group.remove()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", default="512M", help="memory.limit_in_bytes of the site's group")
    p.add_argument("--trainer", choices=("numpy", "torch"), default=None,
                   help="training.trainer in the site's YAML (default: the daemon's own default)")
    p.add_argument("--images", type=int, default=8, help="phantom training images (batch 4, one epoch)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    if not os.access(CGROUP_ROOT, os.W_OK):
        sys.exit(f"{CGROUP_ROOT} is not writable: needs root and a cgroup v1 memory hierarchy")
    with tempfile.TemporaryDirectory(prefix="fednca-board-") as tmp:
        os.chmod(tmp, 0o711)  # mosquitto's user enters it to read the broker files
        report = run(limit=args.limit, trainer=args.trainer, images=args.images, root=Path(tmp))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    sys.exit(0 if report["update_accepted"] and report["round_aggregated"] else 1)


if __name__ == "__main__":
    main()
