"""The edge daemon's CPU budget and footprint, measured with real trainer processes.

For each duty cycle (default 0.25, 0.5, 1.0; one torch thread) a daemon runs in this process
against the in-memory broker and the real coordinator, training the default model (64x64,
40+20 NCA steps, batch 4, low_memory on) on phantom images. Measured between two chunk ends at
least ``--seconds`` apart (whole duty cycles): the CPU time of this process (daemon shell and
coordinator) plus the trainer child, over the wall time, beside the configured share; and the
samples trained per second. The trainer's peak RSS is its own ``ru_maxrss``.

The idle RSS is that of a separate ``fednca daemon`` process with no round to work on (it
imports everything the daemon ever imports; PyTorch only ever lives in the trainer child),
together with the time it takes to stop on SIGTERM.

This process never imports PyTorch: the initial weights are made in a child process.

    .venv/bin/python bench/bench_daemon.py --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from benchlib import emit
from safetensors.numpy import load_file

from fednca.atomic import write_text
from fednca.config import preset, train_preset
from fednca.keys import (CoordinatorKeys, Registry, SiteKeys, read_coordinator_public, write_coordinator_keys,
                         write_site_keys)
from fednca.transport.memory import MemoryBroker
from fednca_broker.config import FederationConfig
from fednca_broker.coordinator import Coordinator
from fednca_broker.rounds import RoundConfig
from fednca_broker.store import RoundStore
from fednca_daemon import config as dc
from fednca_daemon.service import Service

MAKE_WEIGHTS = """
import sys
from safetensors.numpy import save_file
from fednca.config import ModelConfig
from fednca.model import build, tensors
import json
cfg = ModelConfig.from_dict(json.loads(sys.argv[2]))
save_file({k: v.numpy() for k, v in tensors(build(cfg, seed=0)).items()}, sys.argv[1])
"""


def initial_weights(cfg, folder: Path) -> dict[str, Any]:
    path = folder / "initial.safetensors"
    subprocess.run([sys.executable, "-c", MAKE_WEIGHTS, str(path), json.dumps(cfg.to_dict())], check=True)
    return load_file(str(path))


def site_config(root: Path, *, duty: float, threads: int, chunk_s: float, count: int) -> dict[str, Any]:
    return {
        "site": "site-a", "federation": "bench",
        "broker": {"url": "mqtt://127.0.0.1:1", "password": "unused"},
        "keys": {"site": str(root / "site-keys"), "coordinator": str(root / "coordinator-public")},
        "data": {"phantom": {"site": 0, "count": count, "seed": 0}},
        "state_dir": str(root / "state"),
        "cpu": {"threads": threads, "duty_cycle": duty},
        "gates": {"max_temperature_c": None, "min_battery_percent": None},
        "training": {"chunk_s": chunk_s, "low_memory": True},
        "telemetry": {"interval_s": 60.0},
    }


def keys(root: Path) -> tuple[CoordinatorKeys, SiteKeys]:
    coordinator, site = CoordinatorKeys.generate(), SiteKeys.generate()
    write_coordinator_keys(root / "coordinator", coordinator)
    public = root / "coordinator-public"
    public.mkdir(mode=0o700)
    for name in ("signing.pub", "box.pub"):
        (public / name).write_bytes((root / "coordinator" / name).read_bytes())
    write_site_keys(root / "site-keys", site)
    return coordinator, site


def cpu_seconds(*pids: int) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure_duty(duty: float, *, seconds: float, threads: int, chunk_s: float, count: int, model, weights) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ck, sk = keys(root)
        broker = MemoryBroker()
        fed = FederationConfig(name="bench", rounds=RoundConfig(quorum_count=1, round_s=86400.0), max_rounds=1,
                               model=model, train=train_preset(batch_size=4, local_epochs=10_000))
        coordinator = Coordinator(config=fed, store=RoundStore(root=root / "store", federation="bench"), keys=ck,
                                  registry=Registry(sites={"site-a": sk.verify_key}),
                                  client=broker.client(client_id="coordinator"), clock=time.time,
                                  initial_model=weights)
        coordinator.start()
        stop = threading.Event()
        loop = threading.Thread(target=lambda: coordinator.run_until(lambda c: stop.is_set(), poll=0.2), daemon=True)
        loop.start()
        marks: list[tuple[float, float, int]] = []  # (wall, cpu of both processes, samples) at chunk ends
        cfg = dc.parse(site_config(root, duty=duty, threads=threads, chunk_s=chunk_s, count=count), env={})

        def probe(point: str) -> None:
            if point == "chunk-done" and service.worker_pid is not None:
                marks.append((time.monotonic(), cpu_seconds(os.getpid(), service.worker_pid),
                              service.samples_trained))

        service = Service(config=cfg, client=broker.client(client_id="site-a"),
                          site_keys=SiteKeys(signing=sk.signing), coordinator=read_coordinator_public(
                              root / "coordinator-public"), probe=probe)
        runner = threading.Thread(target=service.run, daemon=True)
        runner.start()
        deadline = time.monotonic() + seconds + 600
        while time.monotonic() < deadline and not (marks and marks[-1][0] - marks[0][0] >= seconds):
            time.sleep(0.05)
        pid = service.worker_pid
        service.request_stop()
        runner.join(30)
        stop.set()
        loop.join(10)
        if len(marks) < 2:
            raise SystemExit(f"duty {duty}: fewer than two chunks finished")
        (w0, c0, s0), (w1, c1, s1) = marks[0], marks[-1]
        measured = (c1 - c0) / (w1 - w0)
        configured = duty * threads
        return {
            "duty_cycle": duty, "threads": threads, "configured_share": configured,
            "measured_share": round(measured, 4), "error_pct": round(100 * (measured - configured) / configured, 1),
            "within_10pct": abs(measured - configured) <= 0.1 * configured,
            "samples_per_s": round((s1 - s0) / (w1 - w0), 3), "window_s": round(w1 - w0, 2),
            "chunks": len(marks) - 1, "trainer_pid": pid,
            "trainer_peak_rss_mb": round(service.trainer_peak_rss / 2**20, 1),
            "daemon_and_coordinator_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_process(settle_s: float) -> dict:
    """RSS of a ``fednca daemon`` process with nothing to do, and its stop time on SIGTERM."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys(root)
        data = site_config(root, duty=0.5, threads=1, chunk_s=5.0, count=8)
        data["broker"]["url"] = f"mqtt://127.0.0.1:{free_port()}"  # nobody there: no round, ever
        conf = root / "daemon.yaml"
        write_text(conf, yaml.safe_dump(data), mode=0o600)
        fednca = Path(sys.executable).with_name("fednca")
        proc = subprocess.Popen([str(fednca), "daemon", "--config", str(conf), "--log-level", "warning"],
                                stderr=subprocess.DEVNULL)
        time.sleep(settle_s)
        p = psutil.Process(proc.pid)
        rss = p.memory_info().rss
        torch_loaded = any("libtorch" in m.path for m in p.memory_maps())
        children = len(p.children())
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        return {"idle_rss_mb": round(rss / 2**20, 1), "idle_torch_loaded": torch_loaded, "idle_children": children,
                "stop_s": round(time.monotonic() - start, 3), "exit_status": rc}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window per duty cycle")
    p.add_argument("--duties", default="0.25,0.5,1.0")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunk-s", type=float, default=1.0)
    p.add_argument("--images", type=int, default=32, help="phantom images of the site")
    p.add_argument("--size", type=int, default=64, help="model input size")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    model = preset("fednca", input_size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        weights = initial_weights(model, Path(tmp))
    result: dict[str, Any] = {
        "benchmark": "daemon", "model": {"preset": model.preset, "input_size": model.input_size,
                                         "steps": list(model.steps), "batch": 4, "low_memory": True},
        "chunk_s": args.chunk_s, "images": args.images,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_1min": os.getloadavg()[0]},
        "duty": [measure_duty(float(d), seconds=args.seconds, threads=args.threads, chunk_s=args.chunk_s,
                              count=args.images, model=model, weights=weights) for d in args.duties.split(",")],
    }
    result.update(idle_process(settle_s=3.0))
    result["training_peak_rss_mb"] = max(d["trainer_peak_rss_mb"] for d in result["duty"]) + result["idle_rss_mb"]
    result["bench_imported_torch"] = "torch" in sys.modules
    emit(result, args.out, pretty=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
