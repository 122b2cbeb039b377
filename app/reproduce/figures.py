"""The reproduction's figures, drawn as the FedNCA paper draws its headline one (matplotlib, the
``reproduce`` extra; nothing else in the project imports it).

* ``dice_vs_mib.png``: mean test Dice after the last round against MiB per site per round (up plus
  down, log x), one filled marker per method measured here, and the paper's published points on
  fetal abdominal ultrasound as hollow markers, labelled so;
* ``dice_vs_round.png``: mean test Dice after each round;
* ``dice_vs_cumulative_mib.png``: mean test Dice against the MiB a site has sent and received so
  far (log x): what a given traffic budget buys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .records import MIB, PUBLISHED, RoundResult

MARKERS = "osD^v<>ph8*"  # each one readable hollow as well as filled


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _by_method(results: Sequence[RoundResult]) -> dict[str, list[RoundResult]]:
    out: dict[str, list[RoundResult]] = {}
    for r in results:
        out.setdefault(r.method, []).append(r)
    return out


def draw(folder: Path, results: Sequence[RoundResult], labels: Mapping[str, str]) -> list[Path]:
    """Write the three PNGs into ``folder``; returns their paths."""
    plt = _pyplot()
    runs = _by_method(results)
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(labels)}
    paths = []

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for i, (name, rounds) in enumerate(runs.items()):
        last = rounds[-1]
        ax.scatter([last.bytes_per_site / MIB], [last.dice_mean], marker=MARKERS[i % len(MARKERS)], s=80,
                   color=colours[name], label=f"{labels[name]} (phantom, {last.round} rounds)", zorder=3)
    for j, (label, dice, mib) in enumerate(PUBLISHED):
        ax.scatter([mib], [dice], marker=MARKERS[j % len(MARKERS)], s=80, facecolors="none", edgecolors="0.35",
                   zorder=2)
        ax.annotate(label, (mib, dice), textcoords="offset points", xytext=(-4, 8 if j % 2 else -13), fontsize=7,
                    color="0.35", ha="right")  # above and below in turn: the UNet points lie close together
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.35", label="published, fetal ultrasound")
    _axes(ax, "MiB per site per round (up + down, log scale)", "mean test Dice", log=True)
    ax.set_title("Dice against transmission per round: measured here (filled) and published (hollow)")
    paths.append(_save(plt, fig, folder / "dice_vs_mib.png"))

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for i, (name, rounds) in enumerate(runs.items()):
        ax.plot([r.round for r in rounds], [r.dice_mean for r in rounds], marker=MARKERS[i % len(MARKERS)],
                color=colours[name], label=labels[name])
    _axes(ax, "round", "mean test Dice", log=False)
    ax.set_title("Dice after each round (5 phantom sites, their own test patients)")
    paths.append(_save(plt, fig, folder / "dice_vs_round.png"))

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for i, (name, rounds) in enumerate(runs.items()):
        total, xs = 0.0, []
        for r in rounds:
            total += r.bytes_per_site / MIB
            xs.append(total)
        ax.plot(xs, [r.dice_mean for r in rounds], marker=MARKERS[i % len(MARKERS)], color=colours[name],
                label=labels[name])
    _axes(ax, "cumulative MiB per site (up + down, log scale)", "mean test Dice", log=True)
    ax.set_title("Dice against the traffic a site has spent so far")
    paths.append(_save(plt, fig, folder / "dice_vs_cumulative_mib.png"))
    return paths


def _axes(ax, xlabel: str, ylabel: str, *, log: bool) -> None:
    if log:
        ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")  # the published points sit top and right


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
