"""A federation of N simulated sites through two bridged mosquittos: the round closes, nothing lost.

The parent builds the federation's data with bench_coordinator's ``build_federation`` (coordinator
keys, a registry of N sites, the initial model and one real signed-and-sealed update per site),
writes the central broker's files with the coordinator's own code (``deploy.write_broker_files``)
and then runs the operator's command ``fednca coordinator bridge DIR eu --broker URL --site ...``
for the regional half of the sites, so both brokers run on exactly the files an operator gets:
the central mosquitto, and the regional one with its bridge section, its sites' password hashes
and ACL, each limit sized by the same rule (``mosquitto.limits_for``).

Then, as in ``bench_coordinator.py --broker mosquitto``: the coordinator's session subscribes, and
every site publishes its update over its own connection (``--regional`` of them to the regional
broker, the rest to the central one) while the coordinator is away; the regional broker forwards
its share over the bridge. A child process then runs the coordinator on the central broker and is
timed from ``start()`` until round 2 is announced. Afterwards the bench checks the other way: the
round-2 announcement retained on the regional broker equals the central one, and (``--receipts``)
every regional site finds its receipt queued in its session on the regional broker.

    .venv/bin/python bench/bench_bridge.py --sites 10000            # half regional
    .venv/bin/python bench/bench_bridge.py --sites 1000 --regional 1000 --receipts
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import safetensors.numpy

from benchlib import emit, machine
from bench_coordinator import FEDERATION, PASSWORD, build_federation, peak_rss, site_id

REGION = "eu"
COORDINATOR_ID = "coordinator"


def federation_config(folder: Path, *, central_port: int):
    """The coordinator's configuration for the bench's federation folder, written as coordinator.yaml."""
    import dataclasses

    import yaml

    from fednca.atomic import write_text
    from fednca.config import preset
    from fednca_broker.config import (BrokerConfig, CoordinatorConfig, FederationConfig, MosquittoConfig,
                                      to_yaml_dict)

    cfg = CoordinatorConfig(
        folder=folder, federation=FederationConfig(name=FEDERATION, model=preset("fednca"), max_rounds=None),
        broker=BrokerConfig(url=f"mqtt://127.0.0.1:{central_port}"),
        mosquitto=MosquittoConfig(port=central_port, run_as_root=os.geteuid() == 0),
    )  # fmt: skip
    rounds = dataclasses.replace(cfg.federation.rounds, quorum_fraction=1.0, round_s=3600.0)
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, rounds=rounds))
    write_text(cfg.config_path, yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
    cfg.password_path.parent.mkdir(mode=0o700, exist_ok=True)
    write_text(cfg.password_path, PASSWORD + "\n", mode=0o600)
    return cfg


def set_up_brokers(folder: Path, sites: int, regional: int) -> dict:
    """Both brokers' files (central by the coordinator's code, regional by ``coordinator bridge``), running."""
    from fednca.keys import read_registry
    from fednca_app import harness
    from fednca_app.cli import main
    from fednca_broker import bridge_setup, deploy, mosquitto
    from fednca_broker.regions import read_regions

    central_port, regional_port = harness.free_port(), harness.free_port()
    cfg = federation_config(folder, central_port=central_port)
    registry = read_registry(cfg.registry_path)
    started = time.perf_counter()
    deploy.write_broker_files(cfg, registry=registry, coordinator_password=PASSWORD,
                              site_passwords={site_id(i): PASSWORD for i in range(sites)})  # fmt: skip
    argv = ["coordinator", "bridge", str(folder), REGION, "--broker", f"mqtt://127.0.0.1:{regional_port}"]
    for i in range(regional):
        argv += ["--site", site_id(i)]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the bench's JSON alone
        if main(argv) != 0:
            raise RuntimeError("fednca coordinator bridge failed")
    files_s = time.perf_counter() - started
    central_settings = deploy.settings_for(cfg, sites=sites, account=mosquitto.broker_account(cfg.mosquitto.user))
    central = harness.Mosquitto(settings=central_settings, log_path=folder / "central.log")
    region = read_regions(folder).regions[REGION]
    settings = bridge_setup.regional_settings(cfg, region, account=mosquitto.broker_account(cfg.mosquitto.user))
    regional_broker = harness.Mosquitto(settings=settings, log_path=folder / "regional.log")
    for broker in (central, regional_broker):
        start(broker)
    return {"cfg": cfg, "central": central, "regional": regional_broker, "files_s": files_s,
            "central_settings": central.settings, "regional_settings": settings}  # fmt: skip


def start(broker, *, timeout: float = 300.0) -> None:
    """Start a harness mosquitto and wait until it listens: with 10,000 accounts mosquitto 2.0.11
    takes seconds to read its password and ACL files, longer than the harness's start bound."""
    from fednca_app.harness import listening

    started = time.perf_counter()
    broker.process.start()
    while not listening(broker.port):
        if broker.process.returncode() is not None or time.perf_counter() - started > timeout:
            broker.kill()
            raise RuntimeError(f"mosquitto did not start; see {broker.log_path}")
        time.sleep(0.1)
    broker.start_s = round(time.perf_counter() - started, 1)


def publish_all(data: Path, *, central_url: str, regional_url: str, sites: int, regional: int, threads: int,
                keep_sessions: bool) -> float:
    """Every site publishes its update over its own connection (``threads`` at a time); seconds taken."""
    from fednca.topics import Topics
    from fednca.transport.mqtt import MqttClient

    topics = Topics(FEDERATION)
    failures: list[str] = []
    next_site = iter(range(sites))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_site, None)
            if i is None:
                return
            url = regional_url if i < regional else central_url
            client = MqttClient(url=url, client_id=site_id(i), username=site_id(i), password=PASSWORD,
                                clean_start=not keep_sessions)  # fmt: skip
            try:
                if not client.connect(30):
                    failures.append(f"{site_id(i)}: no connection")
                    continue
                if keep_sessions:  # its receipt will wait in its session on its broker
                    client.subscribe(topics.receipts(site_id(i)), 1)
                payload = (data / "updates" / f"{site_id(i)}.bin").read_bytes()
                client.publish(topics.updates(site_id(i)), payload).result(30)
            except Exception as e:  # reported below: the bench fails rather than counting less
                failures.append(f"{site_id(i)}: {e!r}")
            finally:
                client.disconnect()

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, name=f"sites-{n}") for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if failures:
        raise RuntimeError(f"{len(failures)} site(s) could not publish, first: {failures[0]}")
    return time.perf_counter() - started


def subscribe_coordinator(url: str) -> None:
    """The coordinator's persistent session and its subscription, before any site publishes."""
    from fednca.topics import Topics
    from fednca.transport.mqtt import MqttClient

    session = MqttClient(url=url, client_id=COORDINATOR_ID, username="coordinator", password=PASSWORD)
    session.connect(10)
    session.subscribe(Topics(FEDERATION).all_updates)
    session.disconnect()


def retained_round(url: str, user: str) -> bytes | None:
    """The round announcement a site subscribing now gets (retained), read as ``user``."""
    from fednca.topics import Topics
    from fednca.transport.mqtt import MqttClient

    client = MqttClient(url=url, client_id=user, username=user, password=PASSWORD, clean_start=True)
    client.connect(10)
    client.subscribe(Topics(FEDERATION).round, 1)
    message = client.receive(30)
    client.disconnect()
    return None if message is None else message.payload


def missing_receipts(url: str, sites: list[str], threads: int, wait_s: float) -> list[str]:
    """The regional sites that find no receipt queued in their session on the regional broker
    within ``wait_s`` of connecting."""
    from fednca.transport.mqtt import MqttClient

    missing: list[str] = []
    lock, todo = threading.Lock(), iter(sites)

    def worker() -> None:
        while True:
            with lock:
                site = next(todo, None)
            if site is None:
                return
            client = MqttClient(url=url, client_id=site, username=site, password=PASSWORD)
            try:
                client.connect(60)
                message = client.receive(wait_s)
                if message is not None and message.topic.endswith(f"/receipts/{site}"):
                    client.ack(message)
                else:
                    with lock:
                        missing.append(site)
            finally:
                client.disconnect()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sorted(missing)


# ---------------------------------------------------------------------------------------- child


def child(folder: Path, url: str) -> dict:
    """The coordinator on the central broker, timed from start() until round 2 is announced."""
    from fednca.keys import read_coordinator_keys, read_registry
    from fednca.transport.mqtt import MqttClient
    from fednca_broker.config import load_config
    from fednca_broker.coordinator import Coordinator
    from fednca_broker.store import RoundStore

    cfg = load_config(folder / "coordinator.yaml")
    client = MqttClient(url=url, client_id=COORDINATOR_ID, username="coordinator", password=PASSWORD)
    store = RoundStore(root=cfg.store_root, federation=FEDERATION)
    registry = read_registry(cfg.registry_path)
    coordinator = Coordinator(
        config=cfg.federation, store=store, keys=read_coordinator_keys(cfg.keys_dir), registry=registry,
        client=client, clock=time.time,
        initial_model=safetensors.numpy.load((folder / "model.safetensors").read_bytes()),
    )  # fmt: skip
    started = time.perf_counter()
    coordinator.start()
    closed = coordinator.run_until(lambda c: c.round == 2, poll=1.0, max_steps=1_000_000)
    elapsed = time.perf_counter() - started
    coordinator.wait_published(60)
    client.disconnect()
    summary = next(r for r in store.read_log() if r["kind"] == "round_aggregated")
    return {"closed": bool(closed), "round_close_s": round(elapsed, 2), "accepted": len(summary["sites"]),
            "aggregate_s": summary["seconds"], "peak_rss_mb": round(peak_rss() / 2**20, 1)}  # fmt: skip


# --------------------------------------------------------------------------------------- parent


def commit() -> str:
    """The commit measured: git's, or ``FEDNCA_COMMIT`` for a tree exported without its history."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent, check=False)  # fmt: skip
    return done.stdout.strip() or os.environ.get("FEDNCA_COMMIT", "unknown")


def run(sites: int, regional: int, threads: int, receipts: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="fednca-bench-bridge-") as tmp:
        Path(tmp).chmod(0o755)  # the brokers' files must be readable by the mosquitto user
        folder = Path(tmp) / "fed"
        folder.mkdir()
        started = time.perf_counter()
        build_federation(folder, sites)
        build_s = time.perf_counter() - started
        brokers = set_up_brokers(folder, sites, regional)
        central, regional_broker = brokers["central"], brokers["regional"]
        try:
            subscribe_coordinator(central.url)
            publish_s = publish_all(folder, central_url=central.url, regional_url=regional_broker.url, sites=sites,
                                    regional=regional, threads=threads, keep_sessions=receipts)  # fmt: skip
            print(f"published {sites} updates ({regional} regional) in {publish_s:.1f} s", file=sys.stderr)
            command = [sys.executable, __file__, "--child", str(folder), "--url", central.url]
            done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"coordinator child failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if receipts and regional:  # before anything else connects as a regional site
                sites_there = [site_id(i) for i in range(regional)]
                first = missing_receipts(regional_broker.url, sites_there, threads, wait_s=30)
                late = missing_receipts(regional_broker.url, first, threads, wait_s=120) if first else []
                result["regional_receipts_first_pass"] = regional - len(first)
                result["regional_receipts"] = regional - len(late)
                result["regional_receipts_missing"] = late[:20]
            if regional:
                result["round2_on_regional_broker"] = same_round(central.url, regional_broker.url,
                                                                 user=site_id(regional - 1))
        finally:
            central.stop()
            regional_broker.stop()
        cs, rs = brokers["central_settings"], brokers["regional_settings"]
        return {
            "sites": sites, "regional_sites": regional, "central_sites": sites - regional, **result,
            "build_s": round(build_s, 1), "broker_files_s": round(brokers["files_s"], 1),
            "publish_s": round(publish_s, 1), "publish_threads": threads,
            "central_max_queued_messages": cs.max_queued_messages,
            "central_max_inflight_messages": cs.max_inflight_messages,
            "regional_max_queued_messages": rs.max_queued_messages,
            "regional_max_inflight_messages": rs.max_inflight_messages,
            "ulimit_n": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "central_start_s": central.start_s, "regional_start_s": regional_broker.start_s,
        }  # fmt: skip


def same_round(central_url: str, regional_url: str, *, user: str, timeout: float = 120.0) -> bool:
    """Whether the regional broker comes to hold the central broker's retained announcement."""
    central = retained_round(central_url, user)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if central is not None and retained_round(regional_url, user) == central:
            return True
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=10_000)
    p.add_argument("--regional", type=int, help="sites on the regional broker (default: half)")
    p.add_argument("--threads", type=int, default=8, help="sites publishing at once")
    p.add_argument("--receipts", action="store_true", help="sites keep sessions; count the regional receipts")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.url)))
        return 0
    regional = args.sites // 2 if args.regional is None else args.regional
    result = {"bench": "bridge", "commit": commit(), **run(args.sites, regional, args.threads, args.receipts),
              **machine(), "note": "one run on a shared 2-core machine; figures vary with the load of other processes"}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
