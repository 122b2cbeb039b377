"""The demo's round line: bytes counted by the round they belong to, per site, adding up."""

from types import SimpleNamespace

from fednca.rounds_vocab import CloseReason
from fednca_app.commands.demo import _round_line, _round_row
from fednca_broker.roundlog import RoundAggregatedRecord


def test_a_rounds_traffic_is_its_stored_updates_up_and_its_announcement_down_per_site(tmp_path):
    folder = tmp_path / "store"
    (folder / "rounds" / "3").mkdir(parents=True)
    for site in ("a", "b", "c"):
        (folder / "rounds" / "3" / f"{site}.bin").write_bytes(b"x" * 16 * 1024)
    (folder / "rounds" / "4").mkdir()
    (folder / "rounds" / "4" / "a.bin").write_bytes(b"x" * 99)  # the next round's: not this one's
    record = RoundAggregatedRecord(at=10.0, round=3, reason=CloseReason.GRACE, sites=("a", "b", "c"),
                                   samples=12, method="fedavg", clip_norm=None, model_sha256="ab" * 32,
                                   model_bytes=1, seconds=0.1, metrics_mean={"dice_global": 0.61})  # fmt: skip
    row = _round_row(record, store=SimpleNamespace(folder=folder), announcement=79 * 1024, sites=5,
                     dice={"a": 0.5, "b": 0.7}, seconds=42.0)  # fmt: skip
    assert row["bytes_up"] == 3 * 16 * 1024 and row["bytes_up_per_site"] == 16 * 1024
    assert row["bytes_down"] == 5 * 79 * 1024 and row["bytes_down_per_site"] == 79 * 1024
    line = _round_line(row, rounds=8, sites=5, eta="ETA 2 min")
    assert line.startswith("round 3/8: 3/5 sites")
    assert "per site up 16 KiB, down 79 KiB (round: up 48, down 395 KiB)" in line
    assert "0.600" in line and "measured 0.610" in line and line.endswith("ETA 2 min")
