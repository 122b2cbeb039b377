"""``fednca coordinator init / enroll / revoke / show`` on temporary folders."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from fednca_app.cli import main
from fednca.keys import SiteKeys, key_id, read_coordinator_public, read_registry, write_site_keys
from fednca_broker.cli import RegistryWatcher, kill_hook
from fednca_broker.config import load_config
from fednca_broker.store import RoundStore

pytestmark = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def fed(tmp_path, capsys):
    folder = tmp_path / "fed"
    assert main(["coordinator", "init", str(folder), "--federation", "clinics", "--quorum", "3",
                 "--broker", "mqtt://127.0.0.1:18830", "--max-rounds", "5"]) == 0  # fmt: skip
    capsys.readouterr()
    return folder


def enroll(folder, site, key, *extra):
    return main(["coordinator", "enroll", str(folder), site, key, *extra])


OBSERVERS = ["fednca-status", "fednca-monitor"]  # the read-only views' broker accounts


def users(folder):
    return [line.split(":", 1)[0] for line in (folder / "mosquitto" / "passwd").read_text().splitlines()]


def test_init_makes_a_complete_private_federation_folder(fed, capsys):
    cfg = load_config(fed / "coordinator.yaml")
    f = cfg.federation
    assert (f.name, f.rounds.quorum_count, f.max_rounds, cfg.broker.url) == ("clinics", 3, 5, "mqtt://127.0.0.1:18830")
    assert cfg.mosquitto.port == 18830 and cfg.mosquitto.address == "127.0.0.1"
    assert mode(fed / "keys") == 0o700 and mode(fed / "keys" / "box.key") == mode(fed / "keys" / "signing.key") == 0o600
    assert mode(fed / "secrets" / "mqtt-password") == 0o600
    assert read_registry(fed / "registry.json").sites == {}
    assert RoundStore(root=fed / "store", federation="clinics").model_rounds() == [1]
    conf = (fed / "mosquitto" / "mosquitto.conf").read_text()
    assert "listener 18830 127.0.0.1" in conf and f"acl_file {fed / 'mosquitto' / 'acl'}" in conf
    assert users(fed) == ["coordinator", *OBSERVERS]
    acl = (fed / "mosquitto" / "acl").read_text()
    assert "user coordinator\ntopic read fednca/clinics/updates/+" in acl
    for user in OBSERVERS:  # read-only accounts, their passwords kept as the coordinator's is
        assert f"user {user}\ntopic read fednca/clinics/round\ntopic read fednca/clinics/status/+\n" in acl
        secret = fed / "secrets" / f"{user}-mqtt-password"
        assert mode(secret) == 0o600 and secret.stat().st_uid == (fed / "secrets" / "mqtt-password").stat().st_uid
    assert not [line for line in acl.split("user fednca-status\n")[1].split("\n\n")[0].splitlines()
                if line.startswith("topic write")]
    assert "use_username_as_clientid true" in conf and cfg.mosquitto.bind_client_ids
    assert main(["coordinator", "init", str(fed), "--federation", "clinics"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, named",
    [(["--federation", "Bad Name"], "federation"), (["--federation", "x", "--quorum", "lots"], "--quorum"),
     (["--federation", "x", "--quorum", "1.5"], "--quorum"), (["--federation", "x", "--broker", "http://h"], "--broker")],
)
def test_init_refuses_bad_options_naming_them(tmp_path, capsys, args, named):
    assert main(["coordinator", "init", str(tmp_path / "f"), *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "f" / "coordinator.yaml").exists()


def test_enroll_with_a_key_file_or_hex_gives_the_site_what_it_needs(fed, tmp_path, capsys):
    a, b = SiteKeys.generate(), SiteKeys.generate()
    write_site_keys(tmp_path / "a-keys", a)
    assert enroll(fed, "site-a", str(tmp_path / "a-keys" / "signing.pub")) == 0
    printed = capsys.readouterr().out
    assert "mqtt_password" in printed and "kill -HUP" in printed
    assert enroll(fed, "site-b", bytes(b.verify_key).hex(), "--json", "--out", str(tmp_path / "bundle")) == 0
    sheet = json.loads(capsys.readouterr().out)
    public = read_coordinator_public(fed / "keys")
    assert sheet["coordinator_box_key"] == bytes(public.box).hex()
    assert sheet["coordinator_signing_key_id"] == key_id(public.verify)
    assert (sheet["mqtt_username"], sheet["site_key_id"]) == ("site-b", key_id(b.verify_key))
    assert read_coordinator_public(tmp_path / "bundle") == public
    assert (tmp_path / "bundle" / "mqtt-password").read_text().strip() == sheet["mqtt_password"]
    assert mode(tmp_path / "bundle" / "mqtt-password") == 0o600
    assert read_registry(fed / "registry.json").sites == {"site-a": a.verify_key, "site-b": b.verify_key}
    assert users(fed) == ["coordinator", *OBSERVERS, "site-a", "site-b"]
    acl = (fed / "mosquitto" / "acl").read_text()
    assert "user site-b\ntopic write fednca/clinics/updates/site-b" in acl


def test_enroll_refuses_a_second_enrolment_a_shared_key_and_a_bad_key(fed, capsys):
    key = bytes(SiteKeys.generate().verify_key).hex()
    assert enroll(fed, "site-a", key) == 0
    capsys.readouterr()
    for site, text, why in [("site-a", bytes(SiteKeys.generate().verify_key).hex(), "--replace"),
                            ("site-b", key, "share one key"), ("site-c", "abc", "neither"),
                            ("coordinator", bytes(SiteKeys.generate().verify_key).hex(), "coordinator"),
                            ("fednca-status", bytes(SiteKeys.generate().verify_key).hex(), "of its views")]:
        assert enroll(fed, site, text) == 2
        assert why in capsys.readouterr().err
    assert list(read_registry(fed / "registry.json").sites) == ["site-a"]
    new = SiteKeys.generate().verify_key
    assert enroll(fed, "site-a", bytes(new).hex(), "--replace") == 0
    assert read_registry(fed / "registry.json").sites == {"site-a": new}


def test_revoke_removes_the_key_the_broker_account_and_the_acl_block(fed, capsys):
    assert enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex()) == 0
    assert main(["coordinator", "revoke", str(fed), "site-a"]) == 0
    assert read_registry(fed / "registry.json").sites == {}
    assert users(fed) == ["coordinator", *OBSERVERS] and "site-a" not in (fed / "mosquitto" / "acl").read_text()
    capsys.readouterr()
    assert main(["coordinator", "revoke", str(fed), "site-a"]) == 2
    assert "not enrolled" in capsys.readouterr().err


def test_bad_configuration_is_one_error_naming_every_key(fed, capsys):
    path = fed / "coordinator.yaml"
    data = yaml.safe_load(path.read_text())
    data["round"]["grace_s"] = -5
    data["aggregation"]["method"] = "mean"
    data["broker"]["colour"] = "blue"
    path.write_text(yaml.safe_dump(data))
    for action in ("show", "run"):
        assert main(["coordinator", action, str(fed)]) == 2
        err = capsys.readouterr().err
        assert "3 problem(s)" in err and "Traceback" not in err
        for key in ("round.grace_s", "aggregation.method: unknown aggregator 'mean'", "broker.colour: unknown key"):
            assert key in err
    path.write_text("round: [unclosed\n")
    assert main(["coordinator", "show", str(fed)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_run_refuses_a_password_file_others_can_read(fed, capsys):
    (fed / "secrets" / "mqtt-password").chmod(0o644)
    assert main(["coordinator", "run", str(fed)]) == 2
    assert "broker.password_file" in capsys.readouterr().err


def test_show_prints_the_sites_and_the_round(fed, capsys):
    assert enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex()) == 0
    capsys.readouterr()
    assert main(["coordinator", "show", str(fed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["federation"], info["sites"], info["round"], info["max_rounds"]) == ("clinics", ["site-a"], None, 5)
    assert main(["coordinator", "show", str(fed)]) == 0
    assert "no round opened yet" in capsys.readouterr().out


def test_the_registry_watcher_sees_enrolment_and_survives_a_broken_file(fed):
    watcher = RegistryWatcher(fed / "registry.json")
    assert watcher.changed() is None
    assert enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex()) == 0
    assert list(watcher.changed().sites) == ["site-a"]
    (fed / "registry.json").write_text("{broken")
    assert watcher.changed() is None


def test_the_test_kill_hook_is_off_unless_asked(monkeypatch):
    assert kill_hook(None) is None and kill_hook("") is None
    killed = []
    monkeypatch.setattr("os.kill", lambda pid, sig: killed.append(sig))
    hook = kill_hook("Ack:2")
    for name in ("Ack", "SaveState", "Ack", "Ack"):
        hook(name)
    assert len(killed) == 1


# ----------------------------------------------------------------------- TLS, ownership, broker-config


def tls_init(folder, *extra):
    return main(["coordinator", "init", str(folder), "--federation", "clinics", "--broker",
                 "mqtts://clinic-hub.example:8883", "--listen", "0.0.0.0:8883", "--tls-name", "clinic-hub.example",
                 "--tls-name", "10.0.0.5", *extra])  # fmt: skip


def directives(path):
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_an_mqtts_broker_gets_a_tls_listener_and_certificates_never_a_plain_one(tmp_path, capsys):
    from fednca_broker import tls

    fed = tmp_path / "fed"
    assert tls_init(fed) == 0
    lines = directives(fed / "mosquitto" / "mosquitto.conf")
    assert not any(line.startswith("listener 1883") for line in lines)
    assert [line for line in lines if line.startswith("listener")] == ["listener 8883 0.0.0.0"]
    assert "tls_version tlsv1.2" in lines and f"keyfile {fed / 'mosquitto' / 'server.key'}" in lines
    names = tls.names_of((fed / "mosquitto" / "server.pem").read_bytes())
    assert names == ("clinic-hub.example", "10.0.0.5")
    assert mode(fed / "keys" / "broker-ca.key") == 0o600 and mode(fed / "mosquitto" / "server.key") == 0o640
    cfg = load_config(fed / "coordinator.yaml")
    assert cfg.broker.url == "mqtts://clinic-hub.example:8883" and cfg.broker.ca_file == str(fed / "broker-ca.pem")
    assert cfg.mosquitto.tls_names == ("clinic-hub.example", "10.0.0.5")
    capsys.readouterr()
    assert enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex(), "--out", str(tmp_path / "b")) == 0
    assert (tmp_path / "b" / "ca.crt").read_bytes() == (fed / "broker-ca.pem").read_bytes()


@pytest.mark.parametrize(
    "args, flag",
    [(["--broker", "mqtt://0.0.0.0:1883"], "--broker"), (["--broker", "mqtts://hub:8883"], "--tls-name"),
     (["--broker", "mqtt://hub:1883", "--tls-name", "hub"], "--tls-name"),
     (["--broker", "mqtts://hub:8883", "--tls-name", "hub", "--listen", "0.0.0.0:9999"], "--listen")],
)
def test_init_refuses_contradictory_broker_flags_naming_them(tmp_path, capsys, args, flag):
    assert main(["coordinator", "init", str(tmp_path / "f"), "--federation", "x", *args]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "f" / "coordinator.yaml").exists()


needs_broker_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("getent") is None
    or subprocess.run(["getent", "passwd", "mosquitto"], capture_output=True).returncode != 0,
    reason="needs root and the mosquitto user (Debian's mosquitto package)")


def owner(path):
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, stat.S_IMODE(st.st_mode)


@needs_broker_user
def test_broker_files_stay_root_mosquitto_0640_through_enroll_and_revoke(fed, capsys):
    broker = fed / "mosquitto"
    expected = {"passwd": ("root", "mosquitto", 0o640), "acl": ("root", "mosquitto", 0o640),
                "mosquitto.conf": ("root", "mosquitto", 0o640)}  # fmt: skip
    assert {name: owner(broker / name) for name in expected} == expected
    assert owner(broker) == ("root", "mosquitto", 0o750) and owner(broker / "data")[0] == "mosquitto"
    assert "user mosquitto" in directives(broker / "mosquitto.conf")
    for step in (lambda: enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex()),
                 lambda: enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex(), "--replace"),
                 lambda: main(["coordinator", "revoke", str(fed), "site-a"])):
        assert step() == 0
        assert {name: owner(broker / name) for name in expected} == expected


def test_the_listener_limits_follow_the_enrolled_sites(fed, capsys):
    for i in range(25):
        assert enroll(fed, f"site-{i}", bytes(SiteKeys.generate().verify_key).hex()) == 0
    lines = directives(fed / "mosquitto" / "mosquitto.conf")
    assert "max_queued_messages 2600" in lines and "max_inflight_messages 25" in lines


@pytest.fixture
def open_dir():
    """A folder any user may enter (pytest's own are 0700): where mosquitto's files can live."""
    folder = Path(tempfile.mkdtemp(prefix="fednca-broker-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_broker_config_writes_the_broker_files_again_from_the_configuration(tmp_path, open_dir, capsys):
    fed, broker = tmp_path / "fed", open_dir / "broker"
    assert main(["coordinator", "init", str(fed), "--federation", "clinics", "--broker", "mqtt://127.0.0.1:18830",
                 "--broker-dir", str(broker)]) == 0  # fmt: skip
    assert not (fed / "mosquitto").exists() and (broker / "mosquitto.conf").exists()
    key = bytes(SiteKeys.generate().verify_key).hex()
    assert enroll(fed, "site-a", key) == 0
    site_line = next(line for line in (broker / "passwd").read_text().splitlines() if line.startswith("site-a:"))
    for name in ("mosquitto.conf", "acl"):
        (broker / name).write_text("garbage\n")
    assert main(["coordinator", "broker-config", str(fed)]) == 0
    assert "listener 18830 127.0.0.1" in directives(broker / "mosquitto.conf")
    assert "user site-a" in (broker / "acl").read_text()
    assert site_line in (broker / "passwd").read_text()  # the site keeps its password
    assert [line.split(":")[0] for line in (broker / "passwd").read_text().splitlines()] == [
        "coordinator", *OBSERVERS, "site-a"]
    assert mode(broker / "acl") == mode(broker / "passwd") == 0o640


def test_broker_config_gives_an_older_federation_its_observer_accounts_and_binds_ids(tmp_path, open_dir, capsys):
    fed, broker = tmp_path / "fed", open_dir / "broker"
    assert main(["coordinator", "init", str(fed), "--federation", "clinics", "--broker-dir", str(broker)]) == 0
    assert enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex()) == 0
    # As a federation made before the observers existed: no observer secrets nor accounts, no
    # bind_client_ids key in its file (it reads as the default, true).
    for user in OBSERVERS:
        (fed / "secrets" / f"{user}-mqtt-password").unlink()
        subprocess.run(["mosquitto_passwd", "-D", str(broker / "passwd"), user], check=True, capture_output=True)
    path = fed / "coordinator.yaml"
    data = yaml.safe_load(path.read_text())
    del data["mosquitto"]["bind_client_ids"]
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).mosquitto.bind_client_ids
    assert main(["status", str(fed), "--timeout", "1"]) == 2
    assert "broker-config" in capsys.readouterr().err  # the view says how to get its account
    main(["coordinator", "check", str(fed)])
    said = capsys.readouterr()
    assert "warning: mosquitto:" in said.out + said.err and "read-only view 'fednca-status'" in said.out + said.err
    assert main(["coordinator", "broker-config", str(fed)]) == 0
    assert [line.split(":")[0] for line in (broker / "passwd").read_text().splitlines()] == [
        "coordinator", "site-a", *OBSERVERS]
    assert all(mode(fed / "secrets" / f"{u}-mqtt-password") == 0o600 for u in OBSERVERS)
    assert "use_username_as_clientid true" in (broker / "mosquitto.conf").read_text()
    main(["coordinator", "check", str(fed)])
    said = capsys.readouterr()
    assert "read-only view" not in said.out + said.err and "ACL does not match" not in said.out + said.err


def test_broker_config_refuses_a_broker_folder_mosquitto_cannot_enter(fed, capsys):
    if os.geteuid() != 0:
        pytest.skip("as another user the files are that user's own")
    assert main(["coordinator", "broker-config", str(fed)]) == 2
    assert "chmod o+x" in capsys.readouterr().err


def test_broker_config_moves_to_tls_and_renews_the_certificate(tmp_path, open_dir, capsys):
    fed = tmp_path / "fed"
    assert tls_init(fed, "--broker-dir", str(open_dir / "broker")) == 0
    cert = (open_dir / "broker" / "server.pem").read_bytes()
    ca = (fed / "broker-ca.pem").read_bytes()
    assert main(["coordinator", "broker-config", str(fed)]) == 0
    assert (open_dir / "broker" / "server.pem").read_bytes() == cert  # nothing changed: nothing issued
    assert main(["coordinator", "broker-config", str(fed), "--new-server-certificate"]) == 0
    assert (open_dir / "broker" / "server.pem").read_bytes() != cert and (fed / "broker-ca.pem").read_bytes() == ca
    path = fed / "coordinator.yaml"
    data = yaml.safe_load(path.read_text())
    data["mosquitto"]["port"] = 1883
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert main(["coordinator", "broker-config", str(fed)]) == 2
    assert "mosquitto.port" in capsys.readouterr().err


def test_show_reports_learning_errors_revocations_and_relative_times(fed, capsys):
    import time

    from history_support import write_history

    assert enroll(fed, "site-a", bytes(SiteKeys.generate().verify_key).hex()) == 0
    capsys.readouterr()
    now = time.time()
    write_history(RoundStore(root=fed / "store", federation="clinics"), now=now, finished=False)
    assert main(["coordinator", "show", str(fed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["finished"] is False and info["revoked"] == ["site-b"]
    assert [r["mean"]["dice_global"] for r in info["rounds"]] == [0.30, 0.50]
    assert info["rounds"][1]["sites"]["site-b"] == {"dice_global": 0.48}
    assert info["errors"]["site-a"]["reason"] == "stale_round" and isinstance(info["errors"]["site-a"]["at"], float)
    assert isinstance(info["round"]["deadline"], float)
    assert main(["coordinator", "show", str(fed)]) == 0
    out = capsys.readouterr().out
    assert "revoked: site-b" in out and "stale_round" in out and "min ago" in out
    assert "0.300" in out and "0.520" in out and "deadline" in out and "in 59 min" in out
    assert str(int(now)) not in out  # no raw unix time


def test_show_says_a_finished_federation_is_finished(fed, capsys):
    import time

    from history_support import write_history

    write_history(RoundStore(root=fed / "store", federation="clinics"), now=time.time(), finished=True)
    assert main(["coordinator", "show", str(fed)]) == 0
    out = capsys.readouterr().out
    assert "finished after 2 rounds" in out and "announced as round 3" in out and "deadline" not in out
    assert main(["coordinator", "show", str(fed), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["finished"] is True
