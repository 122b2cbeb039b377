"""The systemd units (checked offline by systemd-analyze) and the install script (into a DESTDIR)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fednca_daemon import config as dc

ROOT = Path(__file__).resolve().parents[1]
SYSTEMD = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze")
FEDNCA = Path(sys.executable).with_name("fednca")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def unit_here(name: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's fednca (verify wants the binary to exist)."""
    text = (SYSTEMD / name).read_text().replace("/opt/fednca/venv/bin/fednca", str(FEDNCA))
    out = tmp_path / name
    out.write_text(text)
    return out


def settings(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            found.setdefault(k.strip(), []).append(v.strip())
    return found


@needs_analyze
@pytest.mark.parametrize("name", ["fednca-daemon.service", "fednca-coordinator.service"])
def test_units_verify_without_a_word(name, tmp_path):
    unit = unit_here(name, tmp_path)
    out = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr


@needs_analyze
@pytest.mark.parametrize("name, limit", [("fednca-daemon.service", 2.0), ("fednca-coordinator.service", 2.0)])
def test_units_expose_little(name, limit, tmp_path):
    unit = unit_here(name, tmp_path)
    out = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                         cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m is not None, out.stdout + out.stderr
    assert float(m.group(1)) <= limit, out.stdout


def test_the_daemon_unit_holds_what_a_board_needs():
    s = settings(SYSTEMD / "fednca-daemon.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and s["Restart"] == ["on-failure"]
    assert int(s["WatchdogSec"][0]) > 0 and s["Nice"] == ["19"] and s["CPUSchedulingPolicy"][0] in ("batch", "idle")
    assert s["IOSchedulingClass"] == ["idle"] and s["UMask"] == ["0077"] and s["User"] == ["fednca"]
    assert s["StateDirectory"] == ["fednca"] and s["ConfigurationDirectory"] == ["fednca"]
    assert s["CPUQuota"][0].endswith("%") and s["MemoryMax"][0].endswith("M")
    assert "MemoryDenyWriteExecute" not in s, "oneDNN's JIT needs writable and executable memory"
    assert sorted(c.split(":")[0] for c in s["LoadCredential"]) == ["mqtt-password", "signing.key"]
    assert s["ExecStart"] == ["/opt/fednca/venv/bin/fednca daemon --config /etc/fednca/daemon.yaml"]


def test_the_install_script_sets_up_a_board_below_a_destdir(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "SKIP_USER": "1", "SKIP_VENV": "1", "SKIP_SYSTEMCTL": "1",
           "FEDNCA": str(FEDNCA)}
    args = [str(SYSTEMD / "install-daemon.sh"), "--site", "clinic-b", "--federation", "liver", "--broker",
            "mqtt://10.1.2.3:1883", "--prefix", "/opt/fednca"]
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fednca keys show /etc/fednca/keys" in out.stdout
    etc = root / "etc" / "fednca"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(etc) == 0o750 and mode(etc / "daemon.yaml") == 0o640
    assert mode(etc / "keys") == 0o700 and mode(etc / "keys" / "signing.key") == 0o600
    data = yaml.safe_load((etc / "daemon.yaml").read_text())
    assert (data["site"], data["federation"], data["broker"]["url"]) == ("clinic-b", "liver", "mqtt://10.1.2.3:1883")
    cfg = dc.parse(data, env={})
    assert cfg.site == "clinic-b" and cfg.state_dir == Path("/var/lib/fednca")
    unit = root / "etc" / "systemd" / "system" / "fednca-daemon.service"
    assert unit.read_text() == (SYSTEMD / "fednca-daemon.service").read_text()
    # Running it again keeps the configuration and the key.
    (etc / "daemon.yaml").write_text((etc / "daemon.yaml").read_text() + "# edited\n")
    key = (etc / "keys" / "signing.key").read_bytes()
    out = subprocess.run(args, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "kept the existing" in out.stdout
    assert (etc / "daemon.yaml").read_text().endswith("# edited\n") and (etc / "keys" / "signing.key").read_bytes() == key
