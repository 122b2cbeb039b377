"""``fednca coordinator``: set up a federation folder, enrol and revoke sites, run the coordinator.

    fednca coordinator init DIR --federation NAME [--broker mqtt://127.0.0.1:1883] [--quorum 0.6]
                                [--listen ADDRESS:PORT] [--tls-name NAME ...] [--broker-dir DIR]
    fednca coordinator enroll DIR SITE KEYFILE|HEX [--out FOLDER] [--replace] [--region REGION]
    fednca coordinator revoke DIR SITE
    fednca coordinator round-keys DIR SITE FILE   (secure aggregation: a site's signed round keys)
    fednca coordinator broker-config DIR [--new-server-certificate]
    fednca coordinator bridge DIR REGION [--broker URL] [--site SITE ...] [--remove-site SITE ...]
    fednca coordinator run DIR [--log-level info] [--workers N]
    fednca coordinator worker DIR --index I               one worker process (run --workers starts them)
    fednca coordinator show DIR [--json]
    fednca coordinator check DIR [--json]                 every problem that would stop run (exit 2)

The folder layout and every configuration key are described in ``broker/config.py`` and
docs/coordinator.md. A configuration problem is one error listing every bad key (exit 2).

``--broker`` is the address sites are told, ``--listen`` what mosquitto binds; ``mqtts://`` makes
the federation's CA and the broker's certificate for the ``--tls-name`` names (broker/listener.py
says which combinations are refused). ``broker-config`` writes every broker file again from
coordinator.yaml (after editing its ``mosquitto`` section, or to renew the server certificate).

``run`` handles SIGTERM and SIGINT by finishing the current step and disconnecting, re-reads the
site registry when ``enroll`` or ``revoke`` changes it, and exits 0 once ``max_rounds`` rounds are
done. Under systemd (``Type=notify``) it sends READY=1 once connected, WATCHDOG=1 from its loop
and STOPPING=1 when it stops. Test hook, not for operators: with ``FEDNCA_COORDINATOR_KILL_AFTER=ACTION[:N]`` in its
environment, ``run`` kills itself with SIGKILL right after performing the N-th (default first)
action of that name (``StoreUpdate``, ``SaveState``, ``Ack``, ``SendReceipt``, ``LogEvent``,
``Announce``, ``SaveModel``, ``LogRound``, ``CloseRound``, ``LogFinished``), so crash tests can
stop it at an exact point of a round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fednca import keys as k
from fednca.config import PRESETS
from fednca.notify import Notifier

from .clients import broker_client
from .config import CONFIG_NAME, BrokerConfig, FederationConfig, load_config
from . import bridge_setup, round_key_commands, setup_commands as setup
from .store import RoundStore

KILL_ENV = "FEDNCA_COORDINATOR_KILL_AFTER"
WORKER_KILL_ENV = "FEDNCA_WORKER_KILL_AFTER"  # the same for workers: Stored, Forwarded, Acked


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create a federation folder: keys, configuration, registry, broker files")
    init.add_argument("folder", type=Path)
    init.add_argument("--federation", required=True, help="the federation id (a-z 0-9 _ -)")
    init.add_argument("--broker", default=BrokerConfig.url,
                      help="the broker address sites connect to, mqtt:// or mqtts:// (default %(default)s)")
    init.add_argument("--listen", metavar="ADDRESS:PORT",
                      help="what mosquitto binds (default: 127.0.0.1 for a loopback --broker, else 0.0.0.0; its port)")
    init.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                      help="a DNS name or IP address of the broker's certificate (repeat; needed by mqtts://)")
    init.add_argument("--broker-dir", type=Path,
                      help="folder of the broker's files, one mosquitto may enter (default: DIR/mosquitto)")
    init.add_argument("--broker-data-dir", type=Path, help="mosquitto's persistence folder (default: BROKER_DIR/data)")
    init.add_argument("--quorum", "--sites-quorum", dest="quorum", default="0.6",
                      help="sites needed to close a round: a fraction of the enrolled (0.6) or a count (3)")
    init.add_argument("--preset", choices=sorted(PRESETS), default="fednca", help="model preset")
    init.add_argument("--model", type=Path, help="start from this model folder instead of fresh weights")
    init.add_argument("--seed", type=int, default=0, help="seed of the fresh initial weights")
    init.add_argument("--max-rounds", type=int, default=FederationConfig.max_rounds)
    enroll = sub.add_parser("enroll", help="enrol a site: its public signing key and broker password")
    enroll.add_argument("folder", type=Path)
    enroll.add_argument("site", help="the site id, also its broker user name")
    enroll.add_argument("key", help="the site's signing.pub file, or its 64 hex digits")
    enroll.add_argument("--replace", action="store_true", help="give an enrolled site a new key and password")
    enroll.add_argument("--out", type=Path, help="also write what the site needs into this folder")
    enroll.add_argument("--json", action="store_true", help="print one JSON object")
    enroll.add_argument("--region", help="the site connects to this region's broker (fednca coordinator bridge)")
    round_key_commands.configure(sub.add_parser("round-keys", help="add a site's signed batch of round keys "
                                                "(secure aggregation)"))
    revoke = sub.add_parser("revoke", help="revoke a site: drop its key and its broker account")
    revoke.add_argument("folder", type=Path)
    revoke.add_argument("site")
    run_p = sub.add_parser("run", help="run the federation's coordinator")
    run_p.add_argument("folder", type=Path)
    run_p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run_p.add_argument("--poll", type=float, default=1.0, help="seconds between clock ticks when idle")
    run_p.add_argument("--workers", type=int, default=0, metavar="N",
                       help="verify and store updates in N worker processes sharing the subscription "
                            "(needs mosquitto.workers >= N; docs/coordinator.md)")
    work = sub.add_parser("worker", help="one coordinator worker process (run --workers starts and restarts them)")
    work.add_argument("folder", type=Path)
    work.add_argument("--index", type=int, required=True, metavar="I", help="which worker account, 1 to N")
    work.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    work.add_argument("--poll", type=float, default=1.0, help="seconds a receive waits when idle")
    conf = sub.add_parser("broker-config", help="write every broker file again from coordinator.yaml")
    conf.add_argument("folder", type=Path)
    conf.add_argument("--new-server-certificate", action="store_true",
                      help="issue the broker's TLS certificate again (same CA: sites need nothing new)")
    bridge_setup.configure(sub)
    back = sub.add_parser("rollback", help="go back to an earlier global model, in a new round (coordinator stopped)")
    back.add_argument("folder", type=Path, metavar="DIR", help="the federation folder")
    back.add_argument("--to-round", type=int, required=True, metavar="N", help="train on from the model of round N")
    check = sub.add_parser("check", help="check everything the coordinator and its broker need; exit 2 on a problem")
    check.add_argument("folder", type=Path)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    show = sub.add_parser("show", help="print the federation's configuration, sites and round")
    show.add_argument("folder", type=Path)
    show.add_argument("--json", action="store_true", help="print one JSON object (times as unix seconds)")
    show.add_argument("--rounds", type=int, default=5, metavar="N", help="the latest N rounds' Dice (default 5)")


def run(args: argparse.Namespace) -> int:
    actions = {"init": setup.init, "enroll": setup.enroll, "revoke": setup.revoke,
               "broker-config": setup.broker_config, "run": _run, "rollback": _rollback, "show": _show,
               "check": _check, "bridge": bridge_setup.run, "worker": _worker,
               "round-keys": round_key_commands.run}  # fmt: skip
    return actions[args.action](args)


# ------------------------------------------------------------------------------------------- run


class RegistryWatcher:
    """Reads the registry file again when its identity, size or modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def changed(self) -> k.Registry | None:
        signature = self._signature()
        if signature == self._seen:
            return None
        self._seen = signature
        try:
            return k.read_registry(self.path)
        except k.RegistryError as e:
            logging.getLogger("fednca.coordinator").error("registry not reloaded, the sites stay as they were: %s", e)
            return None


def kill_hook(spec: str | None) -> Callable[[str], None] | None:
    """The test-only SIGKILL hook of ``FEDNCA_COORDINATOR_KILL_AFTER=ACTION[:N]``."""
    if not spec:
        return None
    name, _, count = spec.partition(":")
    target, seen = int(count or 1), [0]

    def hook(action: str) -> None:
        if action == name:
            seen[0] += 1
            if seen[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _worker(args: argparse.Namespace) -> int:
    from .worker_process import run_worker

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = [False]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.__setitem__(0, True))
    return run_worker(args.folder, args.index, poll=args.poll, stop=lambda: stopping[0],
                      after_action=kill_hook(os.environ.get(WORKER_KILL_ENV)))


def _run(args: argparse.Namespace) -> int:
    from .coordinator import Coordinator
    from .worker_process import retire_workers, supervise
    from .workers import record_key

    cfg = load_config(args.folder / CONFIG_NAME)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.workers <= cfg.mosquitto.workers:
        print(f"--workers {args.workers}: the broker has accounts for {cfg.mosquitto.workers} workers; set "
              f"mosquitto.workers in {cfg.config_path}, run  fednca coordinator broker-config {args.folder}  "
              "and reload mosquitto")
        return 2
    if args.workers and cfg.federation.secure_aggregation.enabled:  # workers open plain updates only
        print(f"--workers {args.workers}: secure_aggregation runs without worker processes in this release")
        return 2
    if args.workers and cfg.federation.rounds.mode == "async":  # workers store an update under its own round
        print(f"--workers {args.workers}: round.mode async runs without worker processes in this release")
        return 2
    client = broker_client(cfg)
    coordinator_store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    coordinator = Coordinator(
        config=cfg.federation, store=coordinator_store,
        keys=k.read_coordinator_keys(cfg.keys_dir), registry=k.read_registry(cfg.registry_path), client=client,
        clock=time.time, after_action=kill_hook(os.environ.get(KILL_ENV)),
        worker_key=record_key(cfg.keys_dir) if cfg.mosquitto.workers else None, take_updates=not args.workers,
    )  # fmt: skip
    workers = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: coordinator.stop())
    watcher = RegistryWatcher(cfg.registry_path)
    notifier = Notifier()
    with coordinator_store.lock():  # one coordinator per store; rollback waits for it to stop
        try:
            coordinator.start()
            if cfg.mosquitto.workers > args.workers and coordinator.takes_records:
                retire_workers(args.folder, args.workers + 1)  # their sessions would keep a share of the updates
            if args.workers:  # after start: the model the workers read the shapes from is stored
                env = {k_: v for k_, v in os.environ.items() if k_ != KILL_ENV}
                workers = supervise([[sys.executable, "-m", "fednca_broker.cli", "worker", str(args.folder),
                                      "--index", str(i), "--log-level", args.log_level, "--poll", str(args.poll)]
                                     for i in range(1, args.workers + 1)], env=env, once=[WORKER_KILL_ENV])  # fmt: skip
            notifier.ready(f"federation {cfg.federation.name}: running")
            pinged = time.monotonic()
            while not coordinator.finished and not coordinator.stopped:
                coordinator.step(args.poll)
                if workers is not None:
                    workers.check()  # a worker that died starts again on its session
                registry = watcher.changed()
                if registry is not None:
                    coordinator.set_registry(registry)
                if notifier.watchdog_interval is not None and time.monotonic() - pinged >= notifier.watchdog_interval:
                    notifier.watchdog()  # from the loop itself: a hung step stops the pings
                    pinged = time.monotonic()
        finally:
            notifier.stopping()
            if workers is not None:
                workers.stop()
            coordinator.close()
            if not coordinator.wait_published(10.0):
                logging.getLogger("fednca.coordinator").warning("the broker did not take every message within 10 s")
            client.disconnect()
            notifier.close()
    return 0


# ------------------------------------------------------------------------------------------ rollback


def _rollback(args: argparse.Namespace) -> int:
    from .rollback import roll_back

    cfg = load_config(args.folder / CONFIG_NAME)
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    with store.lock():
        done = roll_back(store=store, to_round=args.to_round, enrolled=frozenset(k.read_registry(cfg.registry_path).sites),
                         config=cfg.federation.rounds, now=time.time())  # fmt: skip
    abandoned = f"; {done.abandoned} accepted update(s) of the open round abandoned" if done.abandoned else ""
    print(f"round {done.round} will train from the model of round {done.to_round} "
          f"(model {done.model_sha256[:12]}){abandoned}; start the coordinator to announce it")
    return 0


# ------------------------------------------------------------------------------------------ check


def _check(args: argparse.Namespace) -> int:
    from .preflight import main as check_main

    return check_main(args.folder, as_json=args.json)


# ------------------------------------------------------------------------------------------ show


def _show(args: argparse.Namespace) -> int:
    from fednca.display import local_time, relative, safe

    from .round_history import history, render_rounds

    cfg = load_config(args.folder / CONFIG_NAME)
    registry = k.read_registry(cfg.registry_path)
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    state = store.load_state()
    h = history(store.read_log(), enrolled=registry.sites)
    f, now = cfg.federation, time.time()
    info: dict[str, Any] = {
        "federation": f.name, "broker": cfg.broker.url, "sites": sorted(registry.sites),
        "round": None if state is None else {
            "round": state.round, "status": str(state.status), "deadline": float(state.deadline),
            "quorum": state.quorum, "accepted": [a.site for a in state.accepted],
            "close_reason": None if state.close_reason is None else str(state.close_reason),
        },
        "max_rounds": f.max_rounds, "aggregation": f.aggregation.method, "model": f.model.preset,
        "finished": h.finished, "finished_at": h.finished_at, "revoked": list(h.revoked),
        "errors": {s: e.to_dict() for s, e in sorted(h.errors.items())},
        "rounds": [r.to_dict() for r in h.latest(args.rounds)],
    }  # fmt: skip
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"federation {f.name!r} at {cfg.folder} (broker {cfg.broker.url})")
    print(f"  sites ({len(registry.sites)}): {', '.join(sorted(registry.sites)) or 'none enrolled'}"
          + (f"; revoked: {', '.join(h.revoked)}" if h.revoked else ""))
    if state is None:
        print("  no round opened yet")
    elif h.finished:
        print(f"  finished after {h.finished_round} rounds, {local_time(h.finished_at)} "
              f"({relative(h.finished_at, now)}); the final model is announced as round {h.finished_round + 1}")
    else:
        when = f"deadline {local_time(state.deadline)} ({relative(state.deadline, now)})"
        print(f"  round {state.round} of {f.max_rounds or 'unlimited'}: {state.status}"
              + (f" ({state.close_reason})" if state.close_reason else f", {when}")
              + f"; {len(state.accepted)} of {state.quorum} needed accepted")
    for line in render_rounds(h, count=args.rounds, now=now):
        print(f"  {line}")
    for site, e in sorted(h.errors.items()):
        print(f"  error: site {safe(site, 40)}: update of round {e.round} rejected ({safe(e.reason, 40)}), "
              f"{relative(e.at, now)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fednca_broker.cli ACTION ...``: the same commands (how ``run --workers`` starts its workers)."""
    parser = argparse.ArgumentParser(prog="fednca coordinator")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
