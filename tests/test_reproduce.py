"""``fednca reproduce``: its records and figures from literal rounds, and the ``--quick`` run end
to end, which must show the paper's ordering on bytes from measured message lengths."""

from __future__ import annotations

import csv
import json

import pytest

from fednca.errors import ConfigError
from fednca_app.reproduce.methods import METHODS, by_name, quick_plan
from fednca_app.reproduce.records import MIB, RoundResult, csv_rows, summary, write_csv


def result(method: str, rnd: int, dice: tuple[float, float], up: int, down: int) -> RoundResult:
    sites = ("site0", "site1")
    return RoundResult(method=method, round=rnd, dice=dict(zip(sites, dice)), bytes_up=dict.fromkeys(sites, up),
                       bytes_down=dict.fromkeys(sites, down), train_s={"site0": 1.0, "site1": 3.0},
                       peak_rss={"site0": 100 * MIB, "site1": 300 * MIB})


def test_a_round_gives_a_row_per_site_and_a_mean_row(tmp_path):
    rows = csv_rows([result("fednca", 1, (0.5, 0.7), up=1000, down=3000)])
    assert [r["site"] for r in rows] == ["site0", "site1", "mean"]
    mean = rows[-1]
    assert mean["dice"] == 0.6 and mean["train_s"] == 2.0 and mean["peak_rss_mib"] == 300.0
    assert mean["mib_up_down"] == round(4000 / MIB, 6)
    write_csv(tmp_path / "r.csv", [result("fednca", 1, (0.5, 0.7), up=1000, down=3000)])
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 3


def test_the_summary_keeps_each_methods_last_round():
    rounds = [result("a", 1, (0.1, 0.3), 10, 10), result("a", 2, (0.5, 0.7), 10, 30), result("b", 1, (1, 1), 1, 1)]
    doc = summary(rounds, labels={"a": "A", "b": "B", "c": "C"}, parameters={"a": 5}, plan={}, wall_s={"a": 2.0},
                  machine={})
    assert set(doc["methods"]) == {"a", "b"}
    assert doc["methods"]["a"]["final_dice_mean"] == 0.6 and len(doc["methods"]["a"]["rounds"]) == 2
    assert doc["methods"]["a"]["mib_per_site_round"] == round(40 / MIB, 6)
    assert doc["published_fetal_ultrasound"][0] == {"label": "FedNCA", "dice": 0.7895, "mib_per_site_round": 0.0554}


def test_runs_made_apart_combine_into_one_result(tmp_path):
    from fednca_app.cli import main
    from fednca_app.reproduce.records import read_summary, write_json

    for name, rounds in (("a", [result("fednca", 1, (0.5, 0.7), 10, 30)]),
                         ("b", [result("unet-small", 1, (0.6, 0.8), 10**6, 10**6)])):
        (tmp_path / name).mkdir()
        write_json(tmp_path / name / "results.json", summary(rounds, labels={rounds[0].method: "x"},
                                                             parameters={rounds[0].method: 7}, plan={}, wall_s={},
                                                             machine={}))
    assert main(["reproduce", "--combine", str(tmp_path / "b" / "results.json"), str(tmp_path / "a" / "results.json"),
                 "--out", str(tmp_path / "all"), "--no-figures"]) == 0
    results, parameters, _ = read_summary(tmp_path / "all" / "results.json")
    assert [r.method for r in results] == ["fednca", "unet-small"]  # the table's order, not the arguments'
    assert results[0].dice == {"site0": 0.5, "site1": 0.7} and results[0].peak_rss["site1"] == 300 * MIB
    assert parameters == {"fednca": 7, "unet-small": 7}


def test_methods_are_picked_by_name_and_unknown_names_are_refused():
    assert [m.name for m in by_name(["unet-paper", "fednca"])] == ["fednca", "unet-paper"]
    with pytest.raises(ConfigError):
        by_name(["transunet"])
    assert by_name(None) == METHODS


def test_the_figures_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from fednca_app.reproduce.figures import draw

    rounds = [result("a", 1, (0.1, 0.3), 10_000, 10_000), result("a", 2, (0.5, 0.7), 10_000, 10_000),
              result("b", 1, (0.6, 0.8), 10**8, 10**8)]
    paths = draw(tmp_path, rounds, {"a": "A", "b": "B"})
    assert [p.name for p in paths] == ["dice_vs_mib.png", "dice_vs_round.png", "dice_vs_cumulative_mib.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in paths)


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 100 s on an idle two-core machine; several times that when it is shared
def test_quick_shows_fednca_at_least_a_thousand_times_below_the_plain_unet(tmp_path):
    pytest.importorskip("unet")
    pytest.importorskip("matplotlib")
    from fednca_app.cli import main

    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    plan = quick_plan()
    methods = doc["methods"]
    assert set(methods) == {m.name for m in plan.methods}
    nca, unet = methods["fednca"]["rounds"][0], methods["unet-paper"]["rounds"][0]
    # bytes per site per round, each the length of a real message, up and down
    nca_bytes = {s: nca["bytes_up"][s] + nca["bytes_down"][s] for s in nca["bytes_up"]}
    unet_bytes = {s: unet["bytes_up"][s] + unet["bytes_down"][s] for s in unet["bytes_up"]}
    assert set(nca_bytes) == {"site0", "site1"}
    assert all(1000 * nca_bytes[s] <= unet_bytes[s] for s in nca_bytes)
    assert all(29_048 < nca["bytes_up"][s] < 29_048 + 4096 for s in nca_bytes)  # a float32 NCA delta, sealed
    assert methods["fednca"]["parameters"] == 7262 and methods["unet-paper"]["parameters"] == 36_950_273
    assert all(0.0 <= d <= 1.0 for m in methods.values() for r in m["rounds"] for d in r["dice"].values())
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert {r["method"] for r in rows} == set(methods) and all(float(r["peak_rss_mib"]) > 0 for r in rows)
    assert all((tmp_path / name).stat().st_size > 10_000
               for name in ("dice_vs_mib.png", "dice_vs_round.png", "dice_vs_cumulative_mib.png"))
