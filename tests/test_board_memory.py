"""A site daemon and its trainer child train and submit a round inside a 512 MB memory cgroup.

Runs bench/board_memory.py (the real model at batch 4, 8 phantom images, one round against a
coordinator and mosquitto outside the group) with the daemon's default trainer. Skipped where
the cgroup v1 memory hierarchy is not writable (not root, or cgroup v2 only) or mosquitto is
not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mosquitto_fixture import MOSQUITTO

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "board_memory.py"
CGROUP = Path("/sys/fs/cgroup/memory")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.mosquitto,
    pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed"),
    pytest.mark.skipif(not (CGROUP.is_dir() and os.access(CGROUP, os.W_OK)),
                       reason="no writable cgroup v1 memory hierarchy"),
]


def test_the_daemon_and_its_trainer_submit_a_round_within_512_mb():
    out = subprocess.run([sys.executable, str(SCRIPT), "--limit", "512M"], capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["update_accepted"] and report["round_aggregated"] and report["samples"] == 8
    memory = report["memory"]
    assert memory["limit_mb"] == 512.0
    assert memory["oom_kills"] == 0
    assert 0 < memory["max_usage_mb"] <= 512.0
    roles = {p["role"] for p in report["processes"]}
    assert {"daemon", "trainer"} <= roles, report["processes"]  # both ran inside the group
    trainer_peak = max(p["peak_rss_mb"] for p in report["processes"] if p["role"] == "trainer")
    assert trainer_peak <= 200.0, f"the site's trainer peaked at {trainer_peak} MB"
