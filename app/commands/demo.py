"""``fednca demo``: a small federation learning end to end, and what it buys over training alone.

A coordinator and N sites with shifted (non-IID) phantom ultrasound, each site a real daemon
training in its own child process, sealed and signed updates, rounds closed by quorum. One line
per round; then the same compute spent by each site alone (local-only) and on all images pooled.
Writes to ``--out``: the final model, the round log (JSON lines), ``dice.png`` (Dice per round and
site) and ``segmentations.png`` (test images with predicted masks). The federation is set up and
run by :mod:`fednca_app.harness`: in this process on the in-memory broker, or with ``--broker``
as one OS process per party on a mosquitto started from the federation's generated files.
With ``--links``, sites reach that mosquitto through an emulated bad link each (a TCP proxy of
:class:`fednca_app.harness.Link`), the coordinator directly, and the demo ends with what each
link carried and how often it went down.

The defaults fit a few minutes on two cores: 64x64 images as published, with half the published
NCA steps and batch 2 (``--nca-steps 40,20 --batch 4`` for the published recipe, at four times
the compute).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from fednca.display import eta
from fednca.errors import ConfigError
from ..harness import FederationFolder, InProcessParties, Links, ProcessParties, Profile, free_port, set_up
from ..harness.links import profile as link_profile
from .train import _steps

FEDERATION = "demo"
TEST_START = 10_000  # test frames come from other patients than any training frame


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default demo-out)")
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quorum", type=int, default=4, help="updates that close a round (default 4)")
    p.add_argument("--grace", type=float, default=4.0, help="seconds after the quorum for late sites")
    p.add_argument("--train-images", type=int, default=16, help="training images per site (two patients)")
    p.add_argument("--test-images", type=int, default=24, help="test images per site (other patients)")
    p.add_argument("--local-epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2; the published recipe uses 4)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--nca-steps", type=_steps, default=(20, 10), help="NCA steps of stage 1 and 2 (default 20,10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--broker", metavar="mqtt://127.0.0.1:PORT",
                   help="run each party as its own process on a mosquitto the demo starts on this port")
    p.add_argument("--links", metavar="PROFILE | SITE=PROFILE,...",
                   help="put sites behind an emulated bad link (implies --broker, on a free port when not given): "
                        "PROFILE for every site, or SITE=PROFILE,... for some; a PROFILE is 2g, satellite, "
                        "clinic-dsl or a profile YAML file")
    p.add_argument("--update-dtype", choices=["float16", "float32", "q8"], default=None,
                   help="how sites send updates (default: the federation's, float16)")
    p.add_argument("--model-delta", choices=["off", "q8"], default=None,
                   help="q8: each round's model goes down as an 8-bit delta (default: the federation's, off)")
    p.add_argument("--rounds-mode", choices=["sync", "async"], default="sync",
                   help="async: buffered asynchronous rounds, a new model after every --buffer updates (docs/rounds.md)")
    p.add_argument("--buffer", type=int, default=3, help="async: updates per new model (default 3)")
    p.add_argument("--trainer", choices=["numpy", "torch"], default=None,
                   help="the sites' trainer (default: the daemon's, numpy)")
    p.add_argument("--fedavg", action="store_true",
                   help="plain FedAvg without per-update bounds (the rule secure aggregation runs), not the robust default")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="masked updates: the coordinator learns only the sum (docs/secure-aggregation.md)")
    p.add_argument("--no-baselines", action="store_true", help="skip the local-only and pooled baselines")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")


def setup(args: argparse.Namespace, work: Path) -> FederationFolder:
    """A federation folder, enrolled sites with keys and daemon configurations (see
    :func:`fednca_app.harness.set_up`), sized by the demo's options."""
    from fednca.config import preset, train_preset

    url = args.broker or "mqtt://127.0.0.1:1883"  # in-process: the address is only written down
    ports = getattr(args, "link_ports", None) or {}
    return set_up(work, federation=FEDERATION, sites=args.sites, rounds=args.rounds, quorum=args.quorum, url=url,
                  site_urls={name: f"mqtt://127.0.0.1:{port}" for name, port in ports.items()},
                  model=preset(input_size=args.size, steps=tuple(args.nca_steps)),
                  train=train_preset(local_epochs=args.local_epochs, batch_size=args.batch),
                  grace=args.grace, train_images=args.train_images, seed=args.seed, wire=_wire(args),
                  trainer=getattr(args, "trainer", None), round_settings=_round_settings(args),
                  secure_aggregation=getattr(args, "secure_aggregation", False),
                  aggregation=_plain_fedavg() if getattr(args, "fedavg", False) else None)


def _plain_fedavg() -> object:
    from fednca.aggregate import AggregationConfig

    return AggregationConfig(method="fedavg", clip_norm=None, median_norm_factor=None, max_weight_ratio=None)


def _round_settings(args: argparse.Namespace) -> dict[str, object] | None:
    """coordinator.yaml's round keys for ``--rounds-mode async`` (None: the synchronous default)."""
    if getattr(args, "rounds_mode", "sync") != "async":
        return None
    return {"mode": "async", "buffer_size": args.buffer}


def _wire(args: argparse.Namespace) -> dict[str, str]:
    """The wire options given on the command line (coordinator.yaml's update_dtype, model_delta)."""
    given = {"update_dtype": getattr(args, "update_dtype", None), "model_delta": getattr(args, "model_delta", None)}
    return {k: v for k, v in given.items() if v is not None}


def link_profiles(spec: str, *, sites: int) -> dict[str, Profile]:
    """The sites behind a link and their profiles, from ``--links``: ``PROFILE`` puts every site
    behind its own link of that profile, ``site3=2g,site4=PROFILE.yaml`` only the sites named."""
    names = [f"site{i}" for i in range(sites)]
    if "=" not in spec:
        return {name: link_profile(spec) for name in names}
    out: dict[str, Profile] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        site, _, name = item.partition("=")
        if site not in names or not name:
            raise ConfigError("--links", f"{item!r}: give SITE=PROFILE with SITE one of site0..site{sites - 1}")
        out[site] = link_profile(name)
    return out


def _link_lines(links: Links) -> list[str]:
    """``link site1 (2g): up 40 KiB, down 310 KiB, 3 connections, 1 outage (2 dropped, 1 refused)``"""
    lines = []
    for name, link in links.links.items():
        s = link.stats
        lines.append(f"link {name} ({link.profile.name}): up {s.up_bytes / 1024:.0f} KiB, "
                     f"down {s.down_bytes / 1024:.0f} KiB, {s.connections} connections, "
                     f"{s.outages} outage{'s' * (s.outages != 1)} ({s.dropped} dropped, {s.refused} refused, "
                     f"{s.held} held, {s.cut} cut)")
    return lines


def _test_sets(args: argparse.Namespace) -> list:
    from ..compare import Site
    from fednca.phantom import phantom_dataset

    return [Site(name=f"site{i}",
                 train=phantom_dataset(site=i, count=args.train_images, size=args.size, seed=args.seed),
                 test=phantom_dataset(site=i, count=args.test_images, size=args.size, seed=args.seed,
                                      start=TEST_START))
            for i in range(args.sites)]


def _announcement_bytes(sites: tuple) -> int:
    """The size of the round announcement as a site received and stored it."""
    from fednca_daemon.outbox import StateFolder

    for s in sites:
        path = StateFolder(path=s.state_dir).announcement_path
        if path.exists():
            return path.stat().st_size
    return 0


def _round_row(record, *, store, announcement: int, sites: int, dice: dict[str, float], seconds: float) -> dict:
    """One round's line as data. Bytes are counted by the round they belong to: up, the update
    payloads the coordinator stored for this round (what each accepted site sent); down, the
    round's announcement (the model) that every site receives once. Counting the sites'
    cumulative byte counters between two round lines instead mixes rounds: telemetry lags, and a
    round's updates land in the next round's difference."""
    updates = [p.stat().st_size for p in store.folder.joinpath("rounds", str(record.round)).glob("*.bin")]
    up, down = sum(updates), announcement * sites
    return {"round": record.round, "sites": list(record.sites), "reason": str(record.reason),
            "bytes_up": up, "bytes_down": down, "model_bytes_up": up, "model_bytes_down": down,
            "bytes_up_per_site": round(up / max(1, len(updates))), "bytes_down_per_site": announcement,
            "dice": dice, "dice_mean": float(np.mean(list(dice.values()))),
            "reported_dice_mean": record.metrics_mean.get("dice_global"), "seconds": round(seconds, 1)}


def _round_line(row: dict, *, rounds: int, sites: int, eta: str) -> str:
    """``round 3/8: 5/5 sites (...), per site up 16 KiB, down 79 KiB (round: up 80, down 395 KiB), ...``"""
    reported = row["reported_dice_mean"]
    own = "" if reported is None else f" (the sites measured {reported:.3f} on the round's model)"
    return (f"round {row['round']}/{rounds}: {len(row['sites'])}/{sites} sites ({row['reason']}), "
            f"per site up {row['bytes_up_per_site'] / 1024:.0f} KiB, down {row['bytes_down_per_site'] / 1024:.0f} KiB "
            f"(round: up {row['bytes_up'] / 1024:.0f}, down {row['bytes_down'] / 1024:.0f} KiB), "
            f"mean test Dice {row['dice_mean']:.3f}{own}, {row['seconds']:.0f} s, {eta}")


def _traffic(telemetry: dict[str, dict]) -> tuple[int, int]:
    up = sum(int(t.get("bytes_sent") or 0) for t in telemetry.values())
    down = sum(int(t.get("bytes_received") or 0) for t in telemetry.values())
    return up, down


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import torch

    from fednca_broker.roundlog import RoundAggregatedRecord
    from fednca_broker.store import RoundStore

    from fednca import modelfile
    from ..compare import Baselines, site_dice
    from fednca.config import preset, train_preset
    from ..plots import line_chart

    signal.signal(signal.SIGTERM, _interrupted)  # stop the parties and baselines as Ctrl-C does
    if args.sites < 2 or not 1 <= args.quorum <= args.sites or args.rounds < 1:
        raise ConfigError("--sites/--quorum/--rounds", "need at least 2 sites, 1 <= quorum <= sites, rounds >= 1")
    if args.broker and not args.broker.startswith(("mqtt://127.0.0.1:", "mqtt://localhost:")):
        raise ConfigError("--broker", "the demo starts its own mosquitto: give mqtt://127.0.0.1:PORT")
    profiles = link_profiles(args.links, sites=args.sites) if getattr(args, "links", None) else {}
    if profiles and not args.broker:  # the in-memory broker has no TCP to shape
        args.broker = f"mqtt://127.0.0.1:{free_port()}"
    args.link_ports = {name: free_port() for name in profiles}  # written into the daemons' YAML
    torch.set_num_threads(1)
    started = time.monotonic()
    out: Path = args.out.resolve()  # the daemons' YAML files name paths: make them absolute
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    out.mkdir(parents=True, exist_ok=True)
    federation = setup(args, work)
    sites = _test_sets(args)
    model_cfg = preset(input_size=args.size, steps=tuple(args.nca_steps))
    store = RoundStore(root=federation.config().store_root, federation=FEDERATION)
    mode = f"mosquitto at {args.broker}, one process per party" if args.broker else "in-memory broker, one process"
    closing = f"quorum {args.quorum}" if args.rounds_mode == "sync" else f"async, a model per {args.buffer} updates"
    print(f"federation of {args.sites} sites ({mode}); {closing}, {args.rounds} rounds, "
          f"{args.train_images} training and {args.test_images} test images per site", flush=True)
    if profiles:
        print("links: " + ", ".join(f"{name} on {p.name}" for name, p in profiles.items()), flush=True)
    links: Links | None = None
    parties: InProcessParties | ProcessParties = (
        ProcessParties(federation=federation, log_dir=out / "logs") if args.broker
        else InProcessParties(federation=federation))
    history: list[dict] = []
    # Each site trains local_epochs over its images every round: the compute the baselines get.
    steps = args.rounds * args.local_epochs * max(1, args.train_images // args.batch)
    steps_per_site = {s.name: steps for s in sites}
    seen, last_at, traffic = 0, time.time(), (0, 0)
    base = None
    try:
        if isinstance(parties, ProcessParties):
            parties.start_broker()
        if profiles:  # started with the sites, so a profile's outage times count from the sites' start
            links = Links(profiles=profiles, target_port=int(args.broker.rsplit(":", 1)[1]), ports=args.link_ports)
        parties.start()
        parties.telemetry()  # watch the sites' status from the start
        if not args.no_baselines:  # on the cores' idle time, at a lower priority than the federation
            base = Baselines(sites, model_cfg=model_cfg, train_cfg=train_preset(batch_size=args.batch),
                             steps_per_site=steps_per_site, seed=args.seed, background=True)
        while True:
            done = parties.finished()
            closed = [r for r in store.read_log() if isinstance(r, RoundAggregatedRecord)]
            for record in closed[seen:]:
                rnd = record.round
                weights = store.load_model(rnd + 1)
                dice = site_dice(weights, model_cfg, sites, seed=args.seed)
                parties.telemetry()  # keeps the sites' byte counters fresh for the totals at the end
                row = _round_row(record, store=store, announcement=_announcement_bytes(federation.sites),
                                 sites=args.sites, dice=dice, seconds=record.at - last_at)  # fmt: skip
                history.append(row)
                last_at = record.at
                print(_round_line(row, rounds=args.rounds, sites=args.sites,
                                  eta=eta(len(history), args.rounds, time.monotonic() - started)), flush=True)
            seen = len(closed)
            if done and seen >= args.rounds:
                traffic = _traffic(parties.telemetry())  # every byte the sites counted, telemetry included
                break
            time.sleep(0.5)
    except BaseException:
        if base is not None:
            base.cancel()
        raise
    finally:
        parties.close()
        if links is not None:
            links.close()
    fed_seconds = time.monotonic() - started
    final = store.load_model(args.rounds + 1)
    modelfile.save(out / "model", final, model_cfg, federation=FEDERATION, rounds=args.rounds)
    shutil.copyfile(store.log_path, out / "rounds.jsonl")

    final_dice = history[-1]["dice"]
    sent, received = traffic
    model_up = sum(r["model_bytes_up"] for r in history)
    model_down = sum(r["model_bytes_down"] for r in history)
    result = {"rounds": args.rounds, "sites": args.sites, "quorum": args.quorum,
              "final_dice_mean": round(history[-1]["dice_mean"], 4),
              "final_dice": {k: round(v, 4) for k, v in final_dice.items()},
              "bytes_up": max(sent, model_up), "bytes_down": max(received, model_down),
              "model_bytes_per_site_round": round(sum(r["model_bytes_up"] + r["model_bytes_down"] for r in history)
                                                 / (args.rounds * args.sites)),
              "federation_seconds": round(fed_seconds, 1)}
    series = {name: [r["dice"][name] for r in history] for name in final_dice}
    series["mean"] = [r["dice_mean"] for r in history]
    if base is not None:
        print(f"baselines at the same compute ({steps} optimiser steps per site, {steps * args.sites} pooled):",
              flush=True)
        scores = base.result()
        result["local_only"] = {k: round(v, 4) for k, v in scores["local"].items()}
        result["local_only_mean"] = round(float(np.mean(list(scores["local"].values()))), 4)
        result["pooled"] = {k: round(v, 4) for k, v in scores["pooled"].items()}
        result["pooled_mean"] = round(float(np.mean(list(scores["pooled"].values()))), 4)
        series["local-only mean"] = [result["local_only_mean"]] * len(history)
        series["pooled mean"] = [result["pooled_mean"]] * len(history)
    line_chart(out / "dice.png", series, title="test Dice per round (each site on its own test images)",
               xlabel="round", ylabel="Dice", ylim=(0.0, 1.0))
    _segmentations(out / "segmentations.png", final, model_cfg, sites, seed=args.seed)
    result["seconds"] = round(time.monotonic() - started, 1)
    if links is not None:
        result["links"] = {name: {"profile": link.profile.name, **dataclasses.asdict(link.stats)}
                           for name, link in links.links.items()}
    _report(result)
    if links is not None:
        print("\n".join(_link_lines(links)), flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


def _segmentations(path: Path, weights: dict, cfg, sites: list, *, seed: int) -> None:
    import torch

    from fednca.data import to_uint8
    from fednca.model import build
    from ..plots import overlay_grid
    from fednca.train import evaluate

    model = build(cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in weights.items()})
    images, truths, preds, captions = [], [], [], []
    for s in sites:
        few = s.test.subset(range(min(2, len(s.test))))
        ev = evaluate(model, few, seed=seed)
        images += list(to_uint8(few.images[:, 0]))
        truths += list(few.masks[:, 0] > 0.5)
        preds += list(ev.probabilities[:, 0] > 0.5)
        captions += [f"{s.name} dice {d:.2f}" for d in ev.dice]
    overlay_grid(path, np.stack(images), np.stack(truths), np.stack(preds), captions=captions, columns=4)


def _report(r: dict) -> None:
    print(f"final mean test Dice {r['final_dice_mean']:.3f} after {r['rounds']} rounds "
          f"({', '.join(f'{k} {v:.3f}' for k, v in r['final_dice'].items())})")
    if "local_only_mean" in r:
        print(f"local-only mean {r['local_only_mean']:.3f}, pooled mean {r['pooled_mean']:.3f}")
    per_site_round = (r["bytes_up"] + r["bytes_down"]) / max(1, r["rounds"] * r["sites"])
    unet = 2 * 7.8e6 * 4 / 2**20  # a 7.8 M-parameter UNet's float32 weights, down and up
    print(f"traffic per site per round: {r['model_bytes_per_site_round'] / 2**20:.4f} MiB of model and update "
          f"({per_site_round / 2**20:.4f} MiB with telemetry, receipts and reconnects, from the sites' byte "
          f"counters); FedNCA published "
          f"~0.055 MiB (float32), a 7.8 M-parameter UNet would need ~{unet:.1f} MiB; {r['seconds']:.0f} s", flush=True)
