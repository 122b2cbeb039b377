"""``fednca demo --links``: a federation of real processes whose sites reach mosquitto through an
emulated link, finishing its rounds through an outage and reporting what each link carried."""

import json
import subprocess
import sys

import pytest

from fednca.errors import ConfigError
from fednca_app.commands.demo import link_profiles
from fednca_app.harness import free_port, mosquitto_binary

FAST_LINK = """\
name: fast-with-outage
up: {kbit_s: 512, latency_ms: 25}
down: {kbit_s: 512, latency_ms: 25}
outages: {windows: [[3, 5]]}
"""


def test_links_option_names_every_site_or_only_some(tmp_path):
    every = link_profiles("2g", sites=3)
    assert sorted(every) == ["site0", "site1", "site2"] and {p.name for p in every.values()} == {"2g"}
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_LINK)
    some = link_profiles(f"site2=satellite,site0={path}", sites=3)
    assert {k: p.name for k, p in some.items()} == {"site2": "satellite", "site0": "fast-with-outage"}
    with pytest.raises(ConfigError):
        link_profiles("site7=2g", sites=3)


@pytest.mark.mosquitto
@pytest.mark.slow
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_demo_over_links_finishes_and_reports_each_link(tmp_path):
    profile = tmp_path / "fast.yaml"
    profile.write_text(FAST_LINK)
    argv = [sys.executable, "-m", "fednca_app.cli", "demo", "--sites", "2", "--rounds", "2", "--quorum", "2",
            "--train-images", "4", "--test-images", "4", "--nca-steps", "4,2", "--size", "16", "--local-epochs", "1",
            "--grace", "1", "--no-baselines", "--json", "--out", str(tmp_path / "out"),
            "--broker", f"mqtt://127.0.0.1:{free_port()}", "--links", str(profile)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [r.split(":")[0] for r in rounds] == ["round 1/2", "round 2/2"], done.stdout
    assert all(" 2/2 sites " in r for r in rounds), rounds
    result = json.loads(lines[-1])
    assert result["rounds"] == 2 and result["sites"] == 2
    links = result["links"]
    assert sorted(links) == ["site0", "site1"]
    for name, stats in links.items():
        assert stats["profile"] == "fast-with-outage"
        assert stats["up_bytes"] > 0 and stats["down_bytes"] > 0, (name, stats)
        assert stats["connections"] >= 1 and stats["outages"] >= 1, (name, stats)
    printed = [line for line in lines if line.startswith("link site")]
    assert len(printed) == 2 and all("KiB" in p and "outage" in p for p in printed), printed
