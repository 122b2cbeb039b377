"""Coordinator throughput and memory: one round of N simulated sites' real sealed updates.

The parent process builds the federation once (coordinator keys, a registry of the largest N
sites, the default model's initial weights and one signed-and-sealed float16 update per site, made
with fednca.wire) and writes it to a temporary folder. Each measurement runs in a fresh child
process, so its peak RSS is the coordinator's own:

* ``memory``: the in-memory broker in the child. The sites publish as the coordinator drains its
  queue (at most ``FEED_AHEAD`` + a batch waiting): a broker holds its queue in its own process,
  and N x 16 KB of payloads queued inside the coordinator would measure the broker, not it.
* ``mosquitto``: a local mosquitto started here by the federation harness
  (``fednca_app.harness.Mosquitto``) on the federation's generated files. Every site publishes its
  update over its own connection while the coordinator is away (its session queues them), then
  the coordinator starts: one process (``workers`` = 0), or an aggregator with ``workers`` worker
  processes sharing the update subscription (``$share/...``, :mod:`fednca_broker.workers`).

Timed in the child: from ``Coordinator.start()`` (open round 1, take the queued updates, open,
verify, store, count, receipt each) until round 2 is announced (aggregate the round from the
spool, save, announce). ``aggregate_s`` is the close alone; ``per_update_ms`` is the rest divided
by N. Peak RSS is the child's ``VmHWM`` (with workers: the aggregator's, and each worker's).

    .venv/bin/python bench/bench_coordinator.py                     # 100 .. 10,000 sites, in-memory
    .venv/bin/python bench/bench_coordinator.py --sites 1000 --broker mosquitto --workers 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from benchlib import emit, machine

from fednca_app.harness import mosquitto_binary

FEDERATION = "bench"
PASSWORD = "bench-secret"
FEED_AHEAD = 256  # in-memory runs: messages the simulated sites keep queued ahead of the coordinator


def site_id(i: int) -> str:
    return f"site-{i:04d}"


# --------------------------------------------------------------------------------------- parent


def build_federation(folder: Path, sites: int) -> None:
    """Keys, registry, initial model and one sealed update per site, written under ``folder``."""
    from fednca import wire
    from fednca.config import preset
    from fednca.keys import CoordinatorKeys, Registry, SiteKeys, write_coordinator_keys, write_registry
    from fednca.model import build, tensors

    model = {n: t.numpy() for n, t in tensors(build(preset("fednca"), seed=0)).items()}
    coordinator = CoordinatorKeys.generate()
    write_coordinator_keys(folder / "keys", coordinator)
    (folder / "model.safetensors").write_bytes(safetensors.numpy.save(model))
    base, rng, registry = wire.model_sha256(model), np.random.default_rng(0), {}
    (folder / "updates").mkdir()
    started = time.perf_counter()
    for i in range(sites):
        keys = SiteKeys.generate()
        registry[site_id(i)] = keys.verify_key
        delta = {n: rng.normal(0, 1e-3, a.shape).astype(np.float32) for n, a in sorted(model.items())}
        payload = wire.make_update(federation=FEDERATION, site=site_id(i), round=1, base_sha256=base,
                                   samples=int(rng.integers(10, 200)), steps=50, partial=False, metrics={"loss": 0.4},
                                   delta=delta, signing_key=keys.signing, coordinator_box=coordinator.box.public_key)
        (folder / "updates" / f"{site_id(i)}.bin").write_bytes(payload)
    print(f"built {sites} sealed updates in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    write_registry(folder / "registry.json", Registry(sites=registry))


def start_mosquitto(folder: Path, sites: int, workers: int = 0) -> Any:
    """The federation's mosquitto files (ACL and one account per site, and per worker) and mosquitto
    running on them (``fednca_app.harness.Mosquitto``, on a free port)."""
    from fednca_app.harness import Mosquitto, free_port
    from fednca_broker.mosquitto import MosquittoSettings, write_files
    from fednca_broker.workers import worker_users

    settings = MosquittoSettings(federation=FEDERATION, folder=str(folder), port=free_port(), workers=workers,
                                 max_queued_messages=sites + 100, run_as_root=os.geteuid() == 0)
    write_files(settings, coordinator_password=PASSWORD, site_passwords={site_id(i): PASSWORD for i in range(sites)},
                worker_passwords={w: PASSWORD for w in worker_users("coordinator", workers)})
    broker = Mosquitto(settings=settings)
    broker.start()
    return broker


def publish_to_mosquitto(url: str, data: Path, sites: int, client_id: str, workers: int = 0) -> None:
    """Make the coordinator's session (or the workers' shared ones and the aggregator's), then
    publish every site's update over its own connection."""
    from fednca.topics import Topics
    from fednca.transport.mqtt import MqttClient
    from fednca_broker.workers import shared_updates, verified_filter, worker_users

    topics = Topics(FEDERATION)
    session = MqttClient(url=url, client_id=client_id, username="coordinator", password=PASSWORD)
    session.connect(10)
    session.subscribe(verified_filter(FEDERATION) if workers else topics.all_updates)
    session.disconnect()
    for user in worker_users("coordinator", workers):
        worker = MqttClient(url=url, client_id=user, username=user, password=PASSWORD)
        worker.connect(10)
        worker.subscribe(shared_updates(FEDERATION))
        worker.disconnect()
    for i in range(sites):
        site = MqttClient(url=url, client_id=site_id(i), username=site_id(i), password=PASSWORD, clean_start=True)
        site.connect(10)
        site.publish(topics.updates(site_id(i)), (data / "updates" / f"{site_id(i)}.bin").read_bytes()).result(10)
        site.disconnect()


def measure(kind: str, sites: int, data: Path, work: Path, workers: int = 0) -> dict:
    url, broker = "memory://", None
    client_id = f"coordinator-{kind}-{sites}-{workers}"
    if kind == "mosquitto":
        broker = start_mosquitto(work / f"mosquitto-{sites}-{workers}", sites, workers)
        url = broker.url
    try:
        if broker is not None:
            started = time.perf_counter()
            publish_to_mosquitto(url, data, sites, client_id, workers)
            print(f"published {sites} updates to mosquitto in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        command = [sys.executable, __file__, "--child", kind, "--sites", str(sites), "--data", str(data),
                   "--work", str(work / f"{kind}-{sites}-{workers}"), "--url", url, "--client-id", client_id,
                   "--workers", str(workers)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"child {kind} {sites} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if broker is not None:
            broker.stop()


# ---------------------------------------------------------------------------------------- child


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """This process's peak RSS in bytes. Linux's ``ru_maxrss`` also counts the parent's memory
    copied at fork (before exec); ``VmHWM`` is this program's own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Feeding:
    """The coordinator's in-memory client, with the sites publishing as it drains: before each
    ``receive`` the queue is topped up to ``FEED_AHEAD`` messages from the payloads on disk."""

    def __init__(self, *, broker: Any, client_id: str, data: Path, sites: int) -> None:
        from fednca.topics import Topics

        self._broker, self._id, self._data, self._sites, self._next = broker, client_id, data, sites, 0
        self._topics = Topics(FEDERATION)
        self._client = broker.client(client_id=client_id)
        self._client.connect()
        self._client.subscribe(self._topics.all_updates)
        self._sender = broker.client(client_id="sites")
        self._sender.connect()

    def receive(self, timeout: float) -> Any:
        if self._next < self._sites and self._broker.queued(self._id) < FEED_AHEAD // 2:
            for i in range(self._next, min(self._sites, self._next + FEED_AHEAD)):
                payload = (self._data / "updates" / f"{site_id(i)}.bin").read_bytes()
                self._sender.publish(self._topics.updates(site_id(i)), payload).result(1)
            self._next = min(self._sites, self._next + FEED_AHEAD)
        return self._client.receive(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def worker_child(index: int, data: Path, work: Path, url: str) -> int:
    """One worker process of a ``--workers`` run: until killed, take shared updates."""
    import safetensors.numpy

    from fednca.keys import read_coordinator_keys, read_registry
    from fednca.transport.mqtt import MqttClient
    from fednca.wire import max_update_bytes
    from fednca_broker.store import RoundStore
    from fednca_broker.workers import Worker, record_key, worker_user

    user = worker_user("coordinator", index)
    shapes = {n: tuple(a.shape) for n, a in safetensors.numpy.load((data / "model.safetensors").read_bytes()).items()}
    client = MqttClient(url=url, client_id=user, username=user, password=PASSWORD)
    worker = Worker(name=user, federation=FEDERATION, client=client, store=RoundStore(root=work, federation=FEDERATION),
                    keys=read_coordinator_keys(data / "keys"), registry=read_registry(data / "registry.json"),
                    key=record_key(data / "keys"), shapes=shapes, max_update_bytes=max_update_bytes(shapes))
    worker.start()
    while True:
        worker.step(1.0)


def child(kind: str, sites: int, data: Path, work: Path, url: str, client_id: str, workers: int = 0) -> dict:
    import psutil

    from fednca.config import preset
    from fednca.keys import read_coordinator_keys, read_registry
    from fednca_broker.config import FederationConfig
    from fednca_broker.coordinator import Coordinator
    from fednca_broker.store import RoundStore

    registry = read_registry(data / "registry.json")
    registry = type(registry)(sites={site_id(i): registry.sites[site_id(i)] for i in range(sites)})
    if kind == "memory":
        from fednca.transport.memory import MemoryBroker

        broker = MemoryBroker(federation=FEDERATION, max_queued_messages=FEED_AHEAD * 4)
        client = Feeding(broker=broker, client_id=client_id, data=data, sites=sites)
    else:
        from fednca.transport.mqtt import MqttClient

        client = MqttClient(url=url, client_id=client_id, username="coordinator", password=PASSWORD)
    store = RoundStore(root=work, federation=FEDERATION)
    key = None
    if workers:
        from fednca_broker.workers import record_key

        key = record_key(data / "keys")
    coordinator = Coordinator(
        config=FederationConfig(name=FEDERATION, model=preset("fednca"), max_rounds=None),
        store=store, keys=read_coordinator_keys(data / "keys"),
        registry=registry, client=client, clock=time.time,
        initial_model=safetensors.numpy.load((data / "model.safetensors").read_bytes()), worker_key=key,
    )  # fmt: skip
    rss_before = psutil.Process().memory_info().rss
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    coordinator.start()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), "--data", str(data), "--work", str(work),
                               "--url", url]) for i in range(1, workers + 1)]  # fmt: skip
    closed = coordinator.run_until(lambda c: c.round == 2, poll=1.0, max_steps=100_000)
    elapsed = time.perf_counter() - started
    worker_rss = []
    for p in procs:
        worker_rss.append(round(_vm_hwm(p.pid) / 2**20, 1))
        p.kill()
        p.wait()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    coordinator.wait_published(30)
    client.disconnect()
    summary = next(r for r in store.read_log() if r["kind"] == "round_aggregated")
    assert closed and len(summary["sites"]) == sites, "the round did not close with every site"
    aggregate_s = summary["seconds"]
    return {
        "broker": kind,
        "sites": sites,
        "round_close_s": round(elapsed, 3),
        "aggregate_s": aggregate_s,
        "updates_per_s": round(sites / max(elapsed, 1e-9), 1),
        "cpu_s": round(cpu, 3),  # user + system time of all the coordinator's threads
        "per_update_ms": round(1000 * (elapsed - aggregate_s) / sites, 3),
        "verified_per_s": round(sites / max(elapsed - aggregate_s, 1e-9), 1),
        "workers": workers,
        "worker_peak_rss_mb": worker_rss,
        "rss_before_start_mb": round(rss_before / 2**20, 1),
        "peak_rss_mb": round(peak_rss() / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", default="100,1000,3000,10000", help="comma-separated federation sizes")
    p.add_argument("--broker", default="memory", choices=["memory", "mosquitto", "both"])
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--child", choices=["memory", "mosquitto"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--client-id", help=argparse.SUPPRESS)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workers", default="0", help="mosquitto runs: comma-separated worker counts (0: one process)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sites.split(",")]
    if args.worker:
        return worker_child(args.worker, args.data, args.work, args.url)
    if args.child:
        print(json.dumps(child(args.child, sizes[0], args.data, args.work, args.url, args.client_id,
                               int(args.workers))))
        return 0
    counts = [int(w) for w in args.workers.split(",")]
    kinds = ["memory", "mosquitto"] if args.broker == "both" else [args.broker]
    if "mosquitto" in kinds and mosquitto_binary() is None:
        print("mosquitto is not installed: measuring the in-memory broker only", file=sys.stderr)
        kinds.remove("mosquitto")
    with tempfile.TemporaryDirectory(prefix="fednca-bench-") as tmp:
        work = Path(tmp)
        data = work / "federation"
        data.mkdir()
        build_federation(data, max(sizes))
        runs = [measure(kind, n, data, work, w) for kind in kinds for n in sizes
                for w in (counts if kind == "mosquitto" else [0])]
    result: dict = {"bench": "coordinator", "runs": runs}
    for kind in kinds:
        peaks = {r["sites"]: r["peak_rss_mb"] for r in runs if r["broker"] == kind}
        if len(peaks) > 1:
            result[f"{kind}_peak_rss_growth_mb"] = round(peaks[max(peaks)] - peaks[min(peaks)], 1)
    result.update(machine(), note="one run on a shared 2-core machine; figures vary with the load of other processes")
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
