"""``fednca demo --secure-aggregation``: the demo's federation with masked updates, end to end in
one process; each round's update is a masked ring vector (about twice a float16 update)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_demo_runs_with_secure_aggregation(tmp_path):
    argv = [sys.executable, "-m", "fednca_app.cli", "demo", "--sites", "2", "--rounds", "2", "--quorum", "2",
            "--train-images", "4", "--test-images", "4", "--nca-steps", "4,2", "--size", "16", "--local-epochs", "1",
            "--grace", "1", "--no-baselines", "--json", "--secure-aggregation", "--out", str(tmp_path / "out")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [r.split(":")[0] for r in rounds] == ["round 1/2", "round 2/2"] and all(" 2/2 sites " in r for r in rounds)
    result = json.loads(lines[-1])
    assert result["rounds"] == 2
    store = next((tmp_path / "out").rglob("round-keys.json"))
    assert json.loads(store.read_text())["used"] == {"site0": 1, "site1": 1}  # one round key per site and round
