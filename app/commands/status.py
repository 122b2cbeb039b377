"""``fednca status DIR``: a live table of a federation's sites, beside its coordinator.

Reads the sites' retained telemetry (``status/+``) with the read-only observer account
``fednca-status`` (never the coordinator's: with client ids bound, mosquitto's default here, a
second session on the coordinator's account would cut the coordinator off), and the open round
and the round log from the coordinator's store:
a finished federation reads as finished, a revoked site as revoked, a rejected update fills the
site's error column, and the latest rounds' reported test Dice follow the table
(:mod:`fednca_broker.round_history`). ``--watch N`` redraws every N seconds; ``--json`` prints
one object for scripts (times as unix seconds).

One session per observer account: each collection connects, reads the retained telemetry for
``--wait`` seconds and disconnects, also between the redraws of ``--watch``. Two ``fednca status``
at once share the account's one session: the later one takes it over; the earlier one, if still
collecting, comes back after its reconnect delay and, since every status message is retained,
either one gets the whole table on each subscribe. The coordinator and the demo's monitor (an
observer of its own) are never touched.
"""

from __future__ import annotations

import argparse
import json
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


def _round_line(cfg, store_cls, h, now: float) -> tuple[str, dict | None]:
    """The header line and the round's JSON; ``h`` the round log's history (finished or not)."""
    from fednca.display import local_time, relative

    state = store_cls(root=cfg.store_root, federation=cfg.federation.name).load_state()
    if state is None:
        return f"federation {cfg.federation.name}: no round opened yet", None
    info = {"round": state.round, "status": str(state.status), "accepted": len(state.accepted),
            "quorum": state.quorum, "deadline": float(state.deadline), "finished": h.finished,
            "finished_at": h.finished_at}
    if h.finished:
        return (f"federation {cfg.federation.name}: finished after {h.finished_round} rounds, "
                f"{local_time(h.finished_at)} ({relative(h.finished_at, now)})"), info
    when = f"deadline {local_time(state.deadline)} ({relative(state.deadline, now)})"
    return (f"federation {cfg.federation.name}: round {state.round} {state.status}, "
            f"{len(state.accepted)}/{state.quorum} accepted, {when}"), info


def view(cfg, store_cls, registry_sites, latest: dict[str, bytes], now: float) -> tuple[str, dict]:
    """The text and the JSON of the status view: telemetry rows annotated from the round log."""
    from fednca_broker.round_history import history, render_rounds

    from ..fleet import annotate, render, row

    h = history(store_cls(root=cfg.store_root, federation=cfg.federation.name).read_log(), enrolled=registry_sites)
    header, info = _round_line(cfg, store_cls, h, now)
    dice: dict[str, float] = {}
    for summary in h.rounds:
        for site in summary.sites:
            if summary.dice(site) is not None:
                dice[site] = summary.dice(site)  # type: ignore[assignment]
    rows = [annotate(row(site, payload, now), revoked=site in h.revoked,
                     rejected=(f"update rejected: {h.errors[site].reason}" if site in h.errors else None),
                     dice=dice.get(site)) for site, payload in latest.items()]  # fmt: skip
    text = render(rows, header=header) + "\n" + "\n".join(render_rounds(h, count=5, now=now))
    data = {"round": info, "sites": [r.to_dict() for r in rows], "rounds": [r.to_dict() for r in h.latest(5)],
            "revoked": list(h.revoked)}
    return text, data


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
    from fednca_broker.config import CONFIG_NAME, load_config
    from fednca_broker.store import RoundStore

    from fednca.keys import read_registry
    from fednca.topics import Topics

    cfg = load_config(args.folder / CONFIG_NAME)
    topics = Topics(cfg.federation.name)
    latest: dict[str, bytes] = {}
    while True:
        latest.update(_read_telemetry(cfg, topics, wait=args.wait, timeout=args.timeout))
        text, data = view(cfg, RoundStore, read_registry(cfg.registry_path).sites, latest, time.time())
        if args.json:
            print(json.dumps(data))
            return 0
        if args.watch and sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(max(0.0, args.watch - args.wait))


def _read_telemetry(cfg, topics, *, wait: float, timeout: float) -> dict[str, bytes]:
    """The retained telemetry, read in one short session of the status observer account."""
    from fednca_broker.clients import observer_client
    from fednca_broker.config import STATUS_OBSERVER

    client = observer_client(cfg, STATUS_OBSERVER)
    if not client.connect(timeout=timeout):
        raise FedNCAError(f"cannot reach the broker at {cfg.broker.url}")
    try:
        client.subscribe(topics.all_status)
        return _collect(client, topics, wait)
    finally:
        client.disconnect()
