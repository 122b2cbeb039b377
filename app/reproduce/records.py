"""What the reproduction measures per method and round, and how it is written (CSV and JSON).

A :class:`RoundResult` is one round of one method: per site, the test Dice of the round's
aggregated model, the bytes that site sent (its update) and received (the model it trained from),
its local training seconds and its trainer's peak RSS. Bytes are ``len()`` of the real signed (and,
up, sealed) messages. The CSV has one row per method, round and site, plus a ``mean`` row;
the JSON holds the same numbers by method, with the plan and the published points beside them.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

MIB = 2**20

# The FedNCA paper's published points on fetal abdominal ultrasound: (label, Dice, MiB per site per
# round, up plus down).
PUBLISHED: tuple[tuple[str, float, float], ...] = (
    ("FedNCA", 0.7895, 0.0554),
    ("FedNCA + HE", 0.7964, 1.212),
    ("Fed UNet", 0.8050, 521.30),
    ("UNet top-1%", 0.7731, 99.92),
    ("UNet top-25%", 0.7956, 412.70),
    ("UNet 4-bit", 0.2046, 73.32),
    ("Fed TransUNet", 0.8184, 802.16),
)

CSV_COLUMNS = ("method", "round", "site", "dice", "bytes_up", "bytes_down", "mib_up_down", "train_s",
               "peak_rss_mib")


@dataclass(frozen=True)
class RoundResult:
    method: str
    round: int  # 1-based; the Dice is that of the model aggregated at the end of this round
    dice: Mapping[str, float]
    bytes_up: Mapping[str, int]
    bytes_down: Mapping[str, int]
    train_s: Mapping[str, float]
    peak_rss: Mapping[str, int]  # bytes

    @property
    def dice_mean(self) -> float:
        return float(np.mean(list(self.dice.values())))

    @property
    def bytes_per_site(self) -> float:
        """Mean over sites of up plus down: the paper's "MiB per site per round" in bytes."""
        return float(np.mean([self.bytes_up[s] + self.bytes_down[s] for s in self.bytes_up]))

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "dice_mean": round(self.dice_mean, 4),
                "mib_per_site": round(self.bytes_per_site / MIB, 6),
                "dice": {k: round(v, 4) for k, v in self.dice.items()}, "bytes_up": dict(self.bytes_up),
                "bytes_down": dict(self.bytes_down), "train_s": {k: round(v, 2) for k, v in self.train_s.items()},
                "peak_rss_mib": {k: round(v / MIB, 1) for k, v in self.peak_rss.items()}}


def csv_rows(results: Sequence[RoundResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        for site in r.dice:
            rows.append({"method": r.method, "round": r.round, "site": site, "dice": round(r.dice[site], 4),
                         "bytes_up": r.bytes_up[site], "bytes_down": r.bytes_down[site],
                         "mib_up_down": round((r.bytes_up[site] + r.bytes_down[site]) / MIB, 6),
                         "train_s": round(r.train_s[site], 2), "peak_rss_mib": round(r.peak_rss[site] / MIB, 1)})
        sites = list(r.dice)
        rows.append({"method": r.method, "round": r.round, "site": "mean", "dice": round(r.dice_mean, 4),
                     "bytes_up": round(np.mean([r.bytes_up[s] for s in sites])),
                     "bytes_down": round(np.mean([r.bytes_down[s] for s in sites])),
                     "mib_up_down": round(r.bytes_per_site / MIB, 6),
                     "train_s": round(float(np.mean([r.train_s[s] for s in sites])), 2),
                     "peak_rss_mib": round(max(r.peak_rss.values()) / MIB, 1)})
    return rows


def write_csv(path: Path, results: Sequence[RoundResult]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_rows(results))


def summary(results: Sequence[RoundResult], *, labels: Mapping[str, str], parameters: Mapping[str, int],
            plan: Mapping[str, Any], wall_s: Mapping[str, float], machine: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document: the plan, the machine, and per method its rounds and last round."""
    methods: dict[str, Any] = {}
    for name in labels:
        rounds = [r for r in results if r.method == name]
        if not rounds:
            continue
        methods[name] = {"label": labels[name], "parameters": parameters.get(name),
                         "wall_s": round(wall_s.get(name, 0.0), 1), "final_dice_mean": round(rounds[-1].dice_mean, 4),
                         "mib_per_site_round": round(rounds[-1].bytes_per_site / MIB, 6),
                         "rounds": [r.to_dict() for r in rounds]}
    return {"plan": dict(plan), "machine": dict(machine), "methods": methods,
            "published_fetal_ultrasound": [{"label": l, "dice": d, "mib_per_site_round": m} for l, d, m in PUBLISHED]}


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1) + "\n")


def read_summary(path: Path) -> tuple[list[RoundResult], dict[str, int], dict[str, float]]:
    """The rounds, parameter counts and wall seconds of a ``results.json`` (to combine runs made
    apart, e.g. the UNets beside the NCA on a crowded machine)."""
    doc = json.loads(Path(path).read_text())
    results, parameters, wall = [], {}, {}
    for name, m in doc["methods"].items():
        parameters[name], wall[name] = m["parameters"], m["wall_s"]
        for r in m["rounds"]:
            results.append(RoundResult(method=name, round=r["round"], dice=r["dice"], bytes_up=r["bytes_up"],
                                       bytes_down=r["bytes_down"], train_s=r["train_s"],
                                       peak_rss={k: int(v * MIB) for k, v in r["peak_rss_mib"].items()}))
    return results, parameters, wall
