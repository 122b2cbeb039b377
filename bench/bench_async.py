"""Buffered asynchronous rounds against synchronous ones, with two sites on a 2G link.

The 5-site phantom federation of ``fednca demo`` (the harness's ``set_up`` with the demo's model,
training recipe, 16 training images per site, quorum 4 with a 4 s grace), each party an OS process
on mosquitto (``ProcessParties``), site3 and site4 behind the built-in ``2g`` link profile
(``Links``: 64 kbit/s each way, 800 ms round trip, a 20 s outage every 180 s; their first outages
at 60 s and 120 s so that every run meets them). Each repeat runs the federation twice, the two
modes in alternating order (sync then async, async then sync, ...), since this machine's speed
moves from minute to minute:

* ``sync``: the default rounds, ``--rounds`` of them (default 8, the demo's);
* ``async``: ``round.mode: async``, a new model after every ``--buffer`` (3) updates, staleness up
  to ``--max-staleness`` (4), ``--async-rounds`` (16) models: more updates than the synchronous
  run aggregates (about 36), so that the curve can reach the synchronous final Dice if it will.

After each run every model is scored as the demo scores it (mean test Dice over the five sites'
own test patients), against the wall-clock time its round closed. Reported per run: the Dice curve,
the wall time, the updates each site made and what became of them (accepted, refused and why,
never judged: "lost" is made and never counted), and each site's bytes: through the link proxy
for the 2G sites (every byte that crossed, retransmissions and reconnects included) and the sites'
own MQTT counters (telemetry) for all. The comparison: the time async first reaches sync's final
Dice, as a fraction of sync's wall time (goal <= 0.6), and the difference of the final Dice (goal
<= 0.02). The load average is recorded beside each run.

    .venv/bin/python bench/bench_async.py --repeats 2 --out bench/results/async.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchlib import emit, machine

from fednca.atomic import write_text
from fednca.config import preset, train_preset
from fednca.phantom import phantom_dataset
from fednca_app.commands.demo import TEST_START
from fednca_app.compare import Site, site_dice
from fednca_app.harness import Links, ProcessParties, free_port, set_up
from fednca_app.harness.links import profile as link_profile
from fednca_broker.roundlog import RoundAggregatedRecord, UpdateAcceptedRecord, UpdateRejectedRecord
from fednca_broker.store import RoundStore

FEDERATION = "bench"
SITES = 5
SLOW = {"site3": 60.0, "site4": 120.0}  # behind the 2g profile: when each one's first outage begins
STORED = re.compile(r"round (\d+): update (\w+) stored")  # the daemon's log line (update id's first 8 digits)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (sync and async, order alternating)")
    p.add_argument("--rounds", type=int, default=8, help="synchronous rounds (the demo's 8)")
    p.add_argument("--async-rounds", type=int, default=16, help="asynchronous models made")
    p.add_argument("--buffer", type=int, default=3)
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--train-images", type=int, default=16)
    p.add_argument("--test-images", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-limit-s", type=float, default=1800.0, help="give up on one run after this long")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def _test_sites(args: argparse.Namespace) -> list[Site]:
    """Each site's test patients, as ``fednca demo`` scores its models."""
    return [Site(name=f"site{i}",
                 train=phantom_dataset(site=i, count=1, size=64, seed=args.seed),
                 test=phantom_dataset(site=i, count=args.test_images, size=64, seed=args.seed, start=TEST_START))
            for i in range(SITES)]


def run_once(mode: str, args: argparse.Namespace, root: Path, tests: list[Site]) -> dict[str, Any]:
    """One federation in ``mode``, to its last round; its Dice curve, updates and bytes."""
    port = free_port()
    link_ports = {name: free_port() for name in SLOW}
    rounds = args.rounds if mode == "sync" else args.async_rounds
    model, train = preset(input_size=64, steps=(20, 10)), train_preset(local_epochs=3, batch_size=2)
    folder = set_up(root, federation=FEDERATION, sites=SITES, rounds=rounds, quorum=4, url=f"mqtt://127.0.0.1:{port}",
                    site_urls={name: f"mqtt://127.0.0.1:{p}" for name, p in link_ports.items()}, model=model,
                    train=train, grace=4.0, train_images=args.train_images, seed=args.seed,
                    round_settings=None if mode == "sync" else {
                        "mode": "async", "buffer_size": args.buffer, "max_staleness": args.max_staleness})
    base = link_profile("2g")
    profiles = {name: dataclasses.replace(base, outages=dataclasses.replace(base.outages, first_s=first))
                for name, first in SLOW.items()}
    (root / "logs").mkdir(exist_ok=True)
    parties = ProcessParties(federation=folder, log_dir=root / "logs")
    load = [os.getloadavg()[0]]
    links = None
    telemetry: dict[str, dict] = {}
    try:
        parties.start_broker()
        links = Links(profiles=profiles, target_port=port, ports=link_ports)
        started = time.time()
        parties.start()
        finished = False
        while time.time() - started < args.run_limit_s:
            if parties.finished():
                finished = True
                break
            telemetry = parties.telemetry() or telemetry
            time.sleep(2.0)
        telemetry = parties.telemetry() or telemetry
        load.append(os.getloadavg()[0])
    finally:
        parties.close()
        link_stats = {name: dataclasses.asdict(link.stats) for name, link in (links.links.items() if links else ())}
        if links is not None:
            links.close()
    store = RoundStore(root=folder.config().store_root, federation=FEDERATION)
    log = store.read_log()
    aggregated = [r for r in log if isinstance(r, RoundAggregatedRecord)]
    with torch.no_grad():  # scored after the run, on one thread: two threads on a busy machine crawl
        curve = [{"round": r.round, "at_s": round(r.at - started, 1), "reason": str(r.reason), "sites": list(r.sites),
                  "dice_mean": round(statistics.fmean(site_dice(store.load_model(r.round + 1), model, tests,
                                                                seed=args.seed).values()), 4)}
                 for r in aggregated]  # fmt: skip
    reach = 0 if mode == "sync" else args.max_staleness  # how many rounds back an update still counts
    return {"mode": mode, "finished": finished, "wall_s": curve[-1]["at_s"] if curve else None,
            "final_dice": curve[-1]["dice_mean"] if curve else None, "curve": curve,
            "updates": _updates(folder, log, last=curve[-1]["round"] if curve else 0, reach=reach),
            "bytes": _bytes(telemetry, link_stats, rounds=len(curve)), "links": link_stats,
            "load_1min": [round(x, 2) for x in load]}


def _updates(folder: Any, log: list, *, last: int, reach: int) -> dict[str, dict[str, Any]]:
    """Per site: the updates it stored (its log) and what became of each. *Lost*: made and never
    counted, though the federation went on past the last round that could have counted it (refused
    as stale, or dropped when its round closed without it); *in flight*: not judged when the
    federation finished, its round still within reach of the last one."""
    accepted = {(r.site, r.update_id[:8]): r for r in log if isinstance(r, UpdateAcceptedRecord)}
    refused = {(r.site, (r.update_id or "")[:8]): str(r.reason) for r in log if isinstance(r, UpdateRejectedRecord)}
    out = {}
    for site in folder.sites:
        path = folder.folder.parent / "logs" / f"{site.name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        made = {uid: int(rnd) for rnd, uid in STORED.findall(text)}
        counted = [uid for uid in made if (site.name, uid) in accepted]
        reasons: dict[str, int] = {}
        lost = in_flight = 0
        for uid, rnd in made.items():
            if (site.name, uid) in accepted:
                continue
            if (site.name, uid) in refused:
                reasons[refused[(site.name, uid)]] = reasons.get(refused[(site.name, uid)], 0) + 1
                lost += 1
            elif rnd + reach < last:
                lost += 1
            else:
                in_flight += 1
        stale = [accepted[(site.name, uid)].staleness for uid in counted]
        out[site.name] = {"made": len(made), "accepted": len(counted), "refused": reasons, "lost": lost,
                          "in_flight_at_end": in_flight, "staleness": sorted(stale)}
    return out


def _bytes(telemetry: dict[str, dict], links: dict[str, dict], *, rounds: int) -> dict[str, dict[str, Any]]:
    """Per site: what its MQTT client counted (telemetry) and, behind a link, what crossed it
    (retransmissions and reconnects included); per model made, the total of the larger of the two."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(SITES):
        name, t = f"site{i}", telemetry.get(f"site{i}", {})
        row: dict[str, Any] = {"mqtt_sent": t.get("bytes_sent"), "mqtt_received": t.get("bytes_received")}
        if name in links:
            row |= {"link_up": links[name].get("up_bytes"), "link_down": links[name].get("down_bytes")}
        up = max(row.get("link_up") or 0, row["mqtt_sent"] or 0)
        down = max(row.get("link_down") or 0, row["mqtt_received"] or 0)
        row["total_per_model"] = round((up + down) / max(1, rounds))
        out[name] = row
    return out


def compare(sync: dict[str, Any], fast: dict[str, Any]) -> dict[str, Any]:
    """When the async run first reached the sync run's final Dice, as a fraction of sync's wall time."""
    target = sync["final_dice"]
    reached = next((p["at_s"] for p in fast["curve"] if p["dice_mean"] >= target), None)
    return {"sync_final_dice": target, "async_final_dice": fast["final_dice"],
            "final_dice_difference": None if fast["final_dice"] is None else round(fast["final_dice"] - target, 4),
            "async_reached_sync_final_at_s": reached, "sync_wall_s": sync["wall_s"], "async_wall_s": fast["wall_s"],
            "time_fraction": None if reached is None or not sync["wall_s"] else round(reached / sync["wall_s"], 3)}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    torch.set_num_threads(1)
    tests = _test_sites(args)
    runs: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    top = Path(tempfile.mkdtemp(prefix="fednca-bench-async-"))
    top.chmod(0o711)  # mosquitto's user must enter the folders above its files
    try:
        for repeat in range(args.repeats):
            order = ("sync", "async") if repeat % 2 == 0 else ("async", "sync")
            done = {}
            for mode in order:
                root = top / f"{repeat}-{mode}"
                root.mkdir(mode=0o711)
                t = time.monotonic()
                done[mode] = run_once(mode, args, root, tests) | {"repeat": repeat}
                runs.append(done[mode])
                print(f"repeat {repeat} {mode}: final Dice {done[mode]['final_dice']}, wall {done[mode]['wall_s']} s "
                      f"({time.monotonic() - t:.0f} s with scoring), load {done[mode]['load_1min']}",
                      file=sys.stderr, flush=True)
            pairs.append(compare(done["sync"], done["async"]) | {"repeat": repeat, "order": list(order)})
            print(f"repeat {repeat}: {pairs[-1]}", file=sys.stderr, flush=True)
            if args.out:  # each pair as it completes: a long run stopped early keeps what it measured
                write_text(args.out, json.dumps(_result(args, runs, pairs), indent=2) + "\n")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    emit(_result(args, runs, pairs), args.out, pretty=True)
    return 0


def _result(args: argparse.Namespace, runs: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The benchmark's JSON: the settings, a summary over the pairs, each pair, each run."""
    fractions = [p["time_fraction"] for p in pairs if p["time_fraction"] is not None]
    differences = [p["final_dice_difference"] for p in pairs if p["final_dice_difference"] is not None]
    summary = {
        "time_fraction": _spread(fractions), "final_dice_difference": _spread(differences),
        "reached": f"{len(fractions)} of {len(pairs)}",
        "lost": {mode: sum(s["lost"] for r in runs if r["mode"] == mode for s in r["updates"].values())
                 for mode in ("sync", "async")},
        "wall_s": {mode: _spread([r["wall_s"] for r in runs if r["mode"] == mode and r["wall_s"]])
                   for mode in ("sync", "async")},
    }
    return {"benchmark": "async", "machine": machine(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                                      for k, v in vars(args).items()},
            "summary": summary, "pairs": pairs, "runs": runs}


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": round(statistics.median(values), 4), "max": max(values)}


if __name__ == "__main__":
    sys.exit(main())
