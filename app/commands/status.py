"""``fednca status DIR``: a live table of a federation's sites, beside its coordinator.

Reads the sites' retained telemetry (``status/+``) with the coordinator's broker credentials
under a client id of its own, and the open round from the coordinator's store. ``--watch N``
redraws every N seconds; ``--json`` prints one object for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from fednca.errors import FedNCAError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, help="the federation folder made by 'fednca coordinator init'")
    p.add_argument("--json", action="store_true", help="print one JSON object and exit")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until interrupted")
    p.add_argument("--wait", type=float, default=1.5, help="seconds to collect retained telemetry (default 1.5)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")


def _round_line(cfg, store_cls) -> tuple[str, dict | None]:
    state = store_cls(root=cfg.store_root, federation=cfg.federation.name).load_state()
    if state is None:
        return f"federation {cfg.federation.name}: no round opened yet", None
    info = {"round": state.round, "status": state.status, "accepted": len(state.accepted),
            "quorum": state.quorum, "deadline": state.deadline}
    left = state.deadline - time.time()
    when = f"deadline in {left:.0f} s" if left > 0 else "deadline passed"
    return (f"federation {cfg.federation.name}: round {state.round} {state.status}, "
            f"{len(state.accepted)}/{state.quorum} accepted, {when}"), info


def _collect(client, topics, wait: float) -> dict[str, bytes]:
    latest: dict[str, bytes] = {}
    end = time.monotonic() + wait
    while (left := end - time.monotonic()) > 0:
        msg = client.receive(timeout=min(left, 0.2))
        if msg is None:
            continue
        client.ack(msg)
        try:
            parsed = topics.parse(msg.topic)
        except FedNCAError:
            continue
        if parsed.kind == "status" and parsed.site:
            latest[parsed.site] = msg.payload
    return latest


def run(args: argparse.Namespace) -> int:
    from fednca_broker.cli import broker_client
    from fednca_broker.config import CONFIG_NAME, load_config
    from fednca_broker.store import RoundStore

    from ..fleet import render, row
    from fednca.topics import Topics

    cfg = load_config(args.folder / CONFIG_NAME)
    topics = Topics(cfg.federation.name)
    client = broker_client(cfg, client_id=f"fednca-status-{os.getpid()}", clean_start=True)
    if not client.connect(timeout=args.timeout):
        raise FedNCAError(f"cannot reach the broker at {cfg.broker.url}")
    try:
        client.subscribe(topics.all_status)
        latest: dict[str, bytes] = {}
        while True:
            latest.update(_collect(client, topics, args.wait))
            header, info = _round_line(cfg, RoundStore)
            rows = [row(site, payload, time.time()) for site, payload in latest.items()]
            if args.json:
                print(json.dumps({"round": info, "sites": [r.to_dict() for r in rows]}))
                return 0
            if args.watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(render(rows, header=header), flush=True)
            if not args.watch:
                return 0
            time.sleep(max(0.0, args.watch - args.wait))
    finally:
        client.disconnect()
