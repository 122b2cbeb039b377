"""``fednca reproduce``: the FedNCA paper's figure on the project's own phantom federation.

Every method (:data:`fednca_app.reproduce.methods.METHODS`) trains on the same sites, splits,
seeds and test patients with the same recipe and plain FedAvg: FedNCA with the published recipe
and the Med-NCA preset through real daemons and a coordinator on the in-memory broker, the
federated UNets (the ``unet`` package's defaults and a 4-block, 16-channel one, plain and with
float16 or top-k sparsified updates) in a process per site. After every round it writes
``results.csv`` and ``results.json`` into ``--out`` (Dice per site and mean, bytes up and down per
site from the real messages, local training seconds, peak RSS of a site's trainer), and at the end
the figures (``dice_vs_mib.png``, ``dice_vs_round.png``, ``dice_vs_cumulative_mib.png``).

``--quick`` runs two sites for one short round: every path in a minute or two, and the same bytes
per round as the full run (they depend on the model, not on the data). Needs the ``torch`` and
``reproduce`` extras (``pip install -e '.[torch,reproduce]'``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from fednca.errors import ConfigError


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("reproduce-out"), help="output folder (default reproduce-out)")
    p.add_argument("--quick", action="store_true", help="two sites, one short round: a check in a minute or two")
    p.add_argument("--methods", help="comma-separated method names (default: all; see the README)")
    p.add_argument("--rounds", type=int, help="rounds per method (default 10; the costliest methods run 3)")
    p.add_argument("--test-images", type=int, help="test images per site (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--combine", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="train nothing: put the results.json of runs made apart together in --out, with figures "
                        "(a method in several runs is taken from the last one named)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures (no matplotlib needed)")


def _machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "load_average_at_start": [round(v, 2) for v in load]}


def run(args: argparse.Namespace) -> int:
    from ..reproduce.methods import by_name, full_plan, quick_plan
    from ..reproduce.nca_arm import run_nca
    from ..reproduce.records import MIB, summary, write_csv, write_json
    from ..reproduce.unet_arm import run_unet, site_test_sets

    if args.combine:
        return _combine(args)
    import torch

    # One thread: the trainers already fill the cores, and two intra-op threads contending with them
    # made the per-image evaluation some twenty times slower here.
    torch.set_num_threads(1)
    methods = by_name([m.strip() for m in args.methods.split(",")] if args.methods else None)
    overrides = {"seed": args.seed, **({"rounds": args.rounds} if args.rounds else {}),
                 **({"test_images": args.test_images} if args.test_images else {})}
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError("--rounds", "must be at least 1")
    plan = quick_plan(methods if args.methods else None, **overrides) if args.quick else \
        full_plan(methods, **overrides)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tests = site_test_sets(plan)
    machine = _machine()
    labels = {m.name: m.label for m in plan.methods}
    results, parameters, wall = [], {}, {}
    started = time.monotonic()
    print(f"{len(plan.methods)} methods on {plan.sites} phantom sites ({plan.train_images} training, "
          f"{plan.test_images} test images each), up to {plan.rounds} rounds; writing {out}", flush=True)

    def record(r) -> None:
        results.append(r)
        print(f"{r.method} round {r.round}: mean test Dice {r.dice_mean:.3f}, "
              f"{r.bytes_per_site / MIB:.4f} MiB per site (up {max(r.bytes_up.values()):,} B, "
              f"down {max(r.bytes_down.values()):,} B), training {max(r.train_s.values()):.1f} s, "
              f"trainer peak RSS {max(r.peak_rss.values()) / MIB:.0f} MiB", flush=True)
        write_csv(out / "results.csv", results)
        write_json(out / "results.json", summary(results, labels=labels, parameters=parameters,
                                                 plan=plan.to_dict(), wall_s=wall, machine=machine))

    for method in plan.methods:
        t0 = time.monotonic()
        if method.family == "nca":
            _, parameters[method.name] = run_nca(method, plan, tests, work=out / "work" / method.name,
                                                 on_round=record)
        else:
            _, parameters[method.name] = run_unet(method, plan, tests, on_round=record)
        wall[method.name] = time.monotonic() - t0
        print(f"{method.name}: {parameters[method.name]:,} parameters, {wall[method.name]:.0f} s", flush=True)
    total = time.monotonic() - started
    machine["wall_s"] = round(total, 1)
    write_json(out / "results.json", summary(results, labels=labels, parameters=parameters, plan=plan.to_dict(),
                                             wall_s=wall, machine=machine))
    if not args.no_figures:
        from ..reproduce.figures import draw

        for path in draw(out, results, labels):
            print(f"wrote {path}", flush=True)
    print(f"done in {total:.0f} s", flush=True)
    return 0


def _combine(args: argparse.Namespace) -> int:
    """One results.csv, results.json and set of figures from the runs' results.json files."""
    import json

    from ..reproduce.methods import METHODS
    from ..reproduce.records import read_summary, summary, write_csv, write_json

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    by_method: dict = {}
    parameters, wall, plans, machines = {}, {}, [], []
    for path in args.combine:  # a method in several runs: the last run named wins
        r, p, w = read_summary(path)
        for name in p:
            by_method[name] = [x for x in r if x.method == name]
        parameters.update({k: v for k, v in p.items() if v is not None or k not in parameters})
        wall.update(w)  # a run stopped in the middle of a method has no parameter count or wall time for it
        doc = json.loads(path.read_text())
        plans.append(doc["plan"])
        machines.append(doc["machine"])
    results = [x for rounds in by_method.values() for x in rounds]
    order = [m.name for m in METHODS]
    results.sort(key=lambda r: (order.index(r.method) if r.method in order else len(order), r.round))
    labels = {m.name: m.label for m in METHODS if m.name in parameters}
    write_csv(out / "results.csv", results)
    write_json(out / "results.json", summary(results, labels=labels, parameters=parameters,
                                             plan={"runs": plans}, wall_s=wall, machine={"runs": machines}))
    if not args.no_figures:
        from ..reproduce.figures import draw

        for path in draw(out, results, labels):
            print(f"wrote {path}", flush=True)
    return 0
