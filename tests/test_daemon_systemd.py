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


# ------------------------------------------------------------------------------ the coordinator's install

MOSQUITTO_UNIT = next((p for p in (Path("/lib/systemd/system/mosquitto.service"),
                                   Path("/usr/lib/systemd/system/mosquitto.service")) if p.exists()), None)


def install_coordinator(root: Path, prefix: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKIP_VENV": "1"}
    return subprocess.run([str(SYSTEMD / "install-coordinator.sh"), "--root", str(root), "--prefix", str(prefix),
                           *extra], env=env, capture_output=True, text=True)  # fmt: skip


@pytest.fixture
def hub(tmp_path):
    """A scratch root after `install-coordinator.sh --root`, its venv being this checkout's."""
    prefix = tmp_path / "opt" / "fednca"
    prefix.mkdir(parents=True)
    (prefix / "venv").symlink_to(FEDNCA.parent.parent)
    root = tmp_path / "root"
    out = install_coordinator(root, prefix)
    assert out.returncode == 0, out.stderr
    return root, prefix, out.stdout


def test_the_coordinator_install_lays_out_a_hub_below_a_scratch_root(hub):
    root, prefix, printed = hub
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(root / "var/lib/fednca-coordinator") == 0o700 and mode(root / "etc/fednca/mosquitto") == 0o750
    assert mode(root / "var/lib/fednca-mosquitto") == 0o700 and mode(root / "etc/fednca") & 0o001
    unit = root / "etc/systemd/system/fednca-coordinator.service"
    assert settings(unit)["ExecStart"] == [f"{prefix}/venv/bin/fednca coordinator run /var/lib/fednca-coordinator"]
    dropin = settings(root / "etc/systemd/system/mosquitto.service.d/fednca.conf")
    assert dropin["ExecStart"] == ["", "/usr/sbin/mosquitto -c /etc/fednca/mosquitto/mosquitto.conf"]
    assert "--broker-dir /etc/fednca/mosquitto" in printed and "--tls-name HUB" in printed
    again = install_coordinator(root, prefix)  # a second run changes nothing and still succeeds
    assert again.returncode == 0 and unit.read_text() == (SYSTEMD / "fednca-coordinator.service").read_text().replace(
        "/opt/fednca/venv", f"{prefix}/venv")


@needs_analyze
def test_the_installed_units_verify_and_expose_little(hub, tmp_path):
    root, _, _ = hub
    unit = root / "etc/systemd/system/fednca-coordinator.service"
    out = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    out = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True, text=True,
                         cwd=tmp_path)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m is not None and float(m.group(1)) <= 2.0, out.stdout + out.stderr
    if MOSQUITTO_UNIT is None or not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("Debian's mosquitto.service is not installed: the drop-in has nothing to extend")
    units = tmp_path / "units"
    (units / "mosquitto.service.d").mkdir(parents=True)
    shutil.copy(MOSQUITTO_UNIT, units / "mosquitto.service")
    shutil.copy(root / "etc/systemd/system/mosquitto.service.d/fednca.conf", units / "mosquitto.service.d")
    out = subprocess.run([ANALYZE, "verify", str(units / "mosquitto.service")], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr


def test_the_coordinator_unit_is_a_notify_service_with_a_watchdog():
    s = settings(SYSTEMD / "fednca-coordinator.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"] and int(s["WatchdogSec"][0]) > 0
    assert s["User"] == ["fednca-coordinator"] and s["StateDirectory"] == ["fednca-coordinator"]


def test_dry_runs_change_nothing(tmp_path):
    root = tmp_path / "root"
    out = subprocess.run([str(SYSTEMD / "install-coordinator.sh"), "--root", str(root), "--dry-run"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "would run: install -d -m 0750" in out.stdout and "would write:" in out.stdout
    assert not root.exists()
    env = {**os.environ, "DESTDIR": str(root), "SKIP_USER": "1", "SKIP_SYSTEMCTL": "1", "FEDNCA": str(FEDNCA)}
    out = subprocess.run([str(SYSTEMD / "install-daemon.sh"), "--dry-run"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "would run:" in out.stdout and not root.exists()


def test_a_board_installs_without_pytorch_unless_asked(tmp_path):
    env = {**os.environ, "DESTDIR": str(tmp_path / "root"), "SKIP_USER": "1", "SKIP_SYSTEMCTL": "1",
           "FEDNCA": str(FEDNCA)}
    plain = subprocess.run([str(SYSTEMD / "install-daemon.sh"), "--dry-run"], env=env, capture_output=True, text=True)
    pips = [line for line in plain.stdout.splitlines() if "/bin/pip install" in line]
    assert plain.returncode == 0 and len(pips) == 1 and "torch" not in pips[0], plain.stdout
    torch = subprocess.run([str(SYSTEMD / "install-daemon.sh"), "--dry-run", "--with-torch"], env=env,
                           capture_output=True, text=True)  # fmt: skip
    pips = [line for line in torch.stdout.splitlines() if "/bin/pip install" in line]
    assert torch.returncode == 0 and "torch==2.13.0" in pips[0] and pips[1].endswith("[torch]"), torch.stdout
    hub = subprocess.run([str(SYSTEMD / "install-coordinator.sh"), "--root", str(tmp_path / "hub"), "--dry-run"],
                         capture_output=True, text=True)  # fmt: skip
    assert hub.returncode == 0 and any(line.endswith("[torch]") for line in hub.stdout.splitlines()), hub.stdout


@pytest.mark.parametrize("script", ["install-daemon.sh", "install-coordinator.sh"])
def test_the_install_scripts_refuse_an_old_python(script, tmp_path):
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\n[ \"$1\" = -V ] && echo 'Python 3.9.2' && exit 0\nexit 1\n")
    old.chmod(0o755)
    env = {**os.environ, "PYTHON": str(old), "DESTDIR": str(tmp_path / "r"), "SKIP_USER": "1", "SKIP_VENV": "1",
           "SKIP_SYSTEMCTL": "1", "FEDNCA": str(FEDNCA)}
    out = subprocess.run([str(SYSTEMD / script), "--root", str(tmp_path / "r")] if "coordinator" in script
                         else [str(SYSTEMD / script)], env=env, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 1 and "3.11 or newer" in out.stderr and "3.9.2" in out.stderr
    assert not (tmp_path / "r").exists()


def test_the_daemon_yaml_the_install_writes_also_runs_by_hand(tmp_path):
    root = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(root), "SKIP_USER": "1", "SKIP_VENV": "1", "SKIP_SYSTEMCTL": "1",
           "FEDNCA": str(FEDNCA)}
    out = subprocess.run([str(SYSTEMD / "install-daemon.sh"), "--site", "clinic-b", "--federation", "liver",
                          "--broker", "mqtts://hub.example:8883"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = (root / "etc/fednca/daemon.yaml").read_text()
    assert "CREDENTIALS_DIRECTORY" not in text.split("#")[0] and "STATE_DIRECTORY" not in text
    cfg = dc.parse(yaml.safe_load(text), env={})  # no systemd: no credentials, no state directory
    assert cfg.broker.password_file == Path("/etc/fednca/mqtt-password")
    assert cfg.broker.tls.ca_file == Path("/etc/fednca/ca.crt")
    for path in (cfg.state_dir, cfg.keys.site, cfg.keys.coordinator, cfg.data.folder):
        assert path.is_absolute()
    assert "install -m 0600 -o fednca -g fednca BUNDLE/mqtt-password /etc/fednca/mqtt-password" in out.stdout
