"""``fednca daemon --check-config`` and ``fednca coordinator check``: every problem that would stop
the service or fail at run time, reported at once, each naming the file or key and the fix."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from daemon_support import Federation
from fednca import data as fd
from fednca.data import save_folder
from fednca_app.cli import main
from fednca_broker import preflight as bp
from fednca_daemon import preflight as dp
from fednca_daemon.preflight_data import ImageCheck, sample_indices, summarise_split

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files to the mosquitto user")
needs_passwd = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")


def pairs(patients: int, per_patient: int, size: int = 8):
    rng = np.random.default_rng(0)
    for p in range(patients):
        for i in range(per_patient):
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
            yield f"P{p:03d}_{i:03d}", image, image > 128


@pytest.fixture
def site(tmp_path):
    """A site whose configuration and files are all fine: 4 patients of 3 images, 0600 password."""
    fed = Federation(tmp_path)
    save_folder(pairs(4, 3), tmp_path / "data")
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    data = fed.config_data()
    data["broker"] = {"url": "mqtt://127.0.0.1:1883", "password_file": str(secret)}
    data["data"] = {"folder": str(tmp_path / "data"), "test_fraction": 0.25}
    return tmp_path, data


def write(tmp_path: Path, data: dict) -> Path:
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(data))
    conf.chmod(0o600)
    return conf


def check(conf: Path, capsys, *extra: str) -> tuple[int, dict]:
    status = main(["daemon", "--check-config", str(conf), "--json", *extra])
    return status, json.loads(capsys.readouterr().out)


def only(report: dict, key: str) -> list[dict]:
    return [f for f in report["problems"] + report["warnings"] if f["key"] == key]


# --------------------------------------------------------------------------------------- daemon


def test_a_good_site_passes_and_says_what_the_split_holds_out(site, capsys):
    tmp_path, data = site
    conf = write(tmp_path, data)
    assert main(["daemon", "--check-config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "configuration and the files it names are fine" in out
    assert "12 image/mask pair(s)" in out and "decoded 12 of 12 (all)" in out
    assert "holds out 1 patient(s) (3 images); 3 patient(s) (9 images) remain to train" in out
    status, report = check(conf, capsys)
    assert status == 0 and report["ok"] and report["problems"] == [] and report["config"] == str(conf)
    assert [(f["key"], f["severity"]) for f in report["warnings"]] == [("state_dir", "warning")]  # not systemd's
    assert report["data"]["split"]["test_patients"] == 1 and report["data"]["split"]["train_images"] == 9
    assert report["effective"]["broker"]["password"] is None and report["effective"]["data"]["test_fraction"] == 0.25


def test_an_image_without_a_mask_names_both_files_and_the_fix(site, capsys):
    tmp_path, data = site
    (tmp_path / "data" / "masks" / "P001_002.png").unlink()
    status, report = check(write(tmp_path, data), capsys)
    assert status == 2
    (f,) = only(report, "data.folder")
    assert f["path"] == str(tmp_path / "data" / "images" / "P001_002.png")
    assert str(tmp_path / "data" / "masks" / "P001_002.png") in f["problem"]
    assert "add its mask" in f["fix"] and "data.skip_bad: true" in f["fix"]
    data["data"]["skip_bad"] = True  # the trainer leaves the pair out: worth a warning, not a failure
    status, report = check(write(tmp_path, data), capsys)
    assert status == 0 and only(report, "data.folder")[0]["severity"] == "warning"
    assert "left out: data.skip_bad is true" in only(report, "data.folder")[0]["problem"]


def test_a_mask_without_an_image_and_a_stray_file_are_named(site, capsys):
    tmp_path, data = site
    (tmp_path / "data" / "images" / "P002_000.png").unlink()
    (tmp_path / "data" / "images" / "notes.txt").write_text("x")
    status, report = check(write(tmp_path, data), capsys)
    paths = {f["path"]: f for f in only(report, "data.folder")}
    assert status == 2 and set(paths) == {str(tmp_path / "data" / "masks" / "P002_000.png"),
                                          str(tmp_path / "data" / "images" / "notes.txt")}
    assert "not a PNG or JPEG" in paths[str(tmp_path / "data" / "images" / "notes.txt")]["problem"]


def test_a_truncated_png_is_found_by_decoding_and_a_sample_may_miss_it(site, capsys):
    tmp_path, data = site
    bad = tmp_path / "data" / "images" / "P003_001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header (and size) survive, the pixels do not
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "data.folder")
    assert status == 2 and f["path"] == str(bad) and "unreadable image" in f["problem"]
    assert "export the file again" in f["fix"] and "data.skip_bad: true" in f["fix"]
    assert report["data"]["usable"] == 11
    status, report = check(write(tmp_path, data), capsys, "--check-images", "sample", "2")
    assert status == 0 and report["data"]["decoded"] == 2 and report["data"]["check_images"] == "sample 2"


def test_a_mask_of_another_size_names_the_mask(site, capsys):
    tmp_path, data = site
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "data" / "masks" / "P000_000.png")
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "data.folder")
    assert status == 2 and f["path"].endswith("masks/P000_000.png") and "mask is 8x6 but its image" in f["problem"]


def test_an_empty_or_missing_folder_says_what_belongs_there(site, capsys):
    tmp_path, data = site
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "masks").mkdir()
    data["data"]["folder"] = str(empty)
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "data.folder")
    assert status == 2 and "no usable image/mask pair (the folder is empty)" in f["problem"]
    assert f["path"] == str(empty) and "images/NAME.png with masks/NAME.png" in f["fix"]
    data["data"]["folder"] = str(tmp_path / "nowhere")
    status, report = check(write(tmp_path, data), capsys)
    assert status == 2 and [f["path"] for f in only(report, "data.folder")] == [
        str(tmp_path / "nowhere" / "images"), str(tmp_path / "nowhere" / "masks")]


def test_too_few_patients_for_the_test_split(site, capsys):
    tmp_path, data = site
    shutil.rmtree(tmp_path / "data")
    save_folder(pairs(1, 6), tmp_path / "data")
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "data.test_fraction")
    assert status == 2 and "all 6 images belong to one patient" in f["problem"]
    assert "add images of other patients" in f["fix"] and "data.test_fraction: 0" in f["fix"]
    data["data"]["test_fraction"] = 0.0
    assert check(write(tmp_path, data), capsys)[0] == 0


def test_a_missing_password_file_and_no_password_at_all(site, capsys):
    tmp_path, data = site
    (tmp_path / "mqtt-password").unlink()
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "broker.password_file")
    assert status == 2 and f["path"] == str(tmp_path / "mqtt-password") and f["problem"] == "no such file"
    assert "BUNDLE/mqtt-password" in f["fix"]
    del data["broker"]["password_file"]
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "broker.password_file")
    assert status == 2 and "no MQTT password" in f["problem"] and "password_file: /etc/fednca/mqtt-password" in f["fix"]


def test_a_group_readable_key_or_password_is_refused_with_chmod(site, capsys):
    tmp_path, data = site
    key = tmp_path / "site-a" / "keys" / "signing.key"
    key.chmod(0o640)
    (tmp_path / "mqtt-password").chmod(0o644)
    status, report = check(write(tmp_path, data), capsys)
    (k,) = only(report, "keys.site")
    (p,) = only(report, "broker.password_file")
    assert status == 2 and k["path"] == str(key) and "mode 0640" in k["problem"] and k["fix"] == f"chmod 600 {key}"
    assert p["fix"] == f"chmod 600 {tmp_path / 'mqtt-password'}"


def test_every_problem_is_reported_at_once(site, capsys):
    tmp_path, data = site
    (tmp_path / "site-a" / "keys" / "signing.key").unlink()
    (tmp_path / "coordinator" / "box.pub").unlink()
    (tmp_path / "mqtt-password").unlink()
    (tmp_path / "data" / "masks" / "P000_000.png").unlink()
    (tmp_path / "state").write_text("a file where the state folder goes")
    data["state_dir"] = str(tmp_path / "state")
    conf = write(tmp_path, data)
    assert main(["daemon", "--check-config", str(conf)]) == 2
    err = capsys.readouterr().err
    for text in ("keys.site", "no such key file", "fednca keys generate --role site",
                 "keys.coordinator", "box.pub", "BUNDLE/box.pub", "broker.password_file",
                 "state_dir", "exists and is not a folder", "image has no mask", "5 problem(s)"):
        assert text in err, text


def test_an_mqtts_broker_needs_its_ca(site, capsys):
    tmp_path, data = site
    data["broker"]["url"] = "mqtts://hub:8883"
    status, report = check(write(tmp_path, data), capsys)
    assert status == 0 and only(report, "broker.tls.ca_file")[0]["severity"] == "warning"
    data["broker"]["tls"] = {"ca_file": str(tmp_path / "ca.crt")}
    status, report = check(write(tmp_path, data), capsys)
    (f,) = only(report, "broker.tls.ca_file")
    assert status == 2 and f["path"] == str(tmp_path / "ca.crt") and "BUNDLE/ca.crt" in f["fix"]


def test_paths_the_units_sandbox_hides_are_warned_of(site):
    tmp_path, data = site
    data["data"]["folder"] = "/home/op/images"
    data["state_dir"] = "/var/lib/fednca"
    from fednca_daemon import config as dc

    (f,) = dp.unit_findings(dc.parse(data, env={}))
    assert f.key == "data.folder" and "ProtectHome=yes" in f.problem and f.severity == "warning"
    data["state_dir"] = "/srv/state"
    assert [f.key for f in dp.unit_findings(dc.parse(data, env={}))] == ["state_dir", "data.folder"]
    assert "ReadWritePaths=/srv/state" in dp.unit_findings(dc.parse(data, env={}))[0].fix


def test_bad_keys_are_reported_before_any_file_is_read(tmp_path, capsys):
    conf = write(tmp_path, {"site": "a", "federation": "f", "broker": {"url": "mqtt://h:1"}, "data": {"folder": "/x"},
                            "cpu": {"duty_cycle": 0}})
    status, report = check(conf, capsys)
    assert status == 2 and [f["key"] for f in report["problems"]] == ["cpu.duty_cycle"] and report["effective"] is None


def test_check_images_takes_all_or_sample_n(site, capsys):
    tmp_path, data = site
    assert main(["daemon", "--check-config", str(write(tmp_path, data)), "--check-images", "sample", "0"]) == 2
    assert "--check-images: must be 'all' or 'sample N'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- pure parts


def test_pairing_is_pure_over_the_listings():
    p = fd.pair_names(["a.png", "b.png", "c.jpg", "c.png", "notes.txt"], ["a.png", "b.PNG", "d.png"])
    assert p.pairs == (("a", "a.png", "a.png"), ("b", "b.png", "b.PNG"))
    assert p.images_without_mask == ("c.jpg",) and p.masks_without_image == ("d.png",)
    assert [n for n, _ in p.unusable] == ["images/c.png", "images/notes.txt"]


def test_sample_indices_spread_evenly_and_include_both_ends():
    assert sample_indices(10, None) == list(range(10)) and sample_indices(3, 5) == [0, 1, 2]
    assert sample_indices(10, 3) == [0, 4, 9]
    assert sample_indices(1000, 200)[0] == 0 and sample_indices(1000, 200)[-1] == 999
    assert len(sample_indices(1000, 200)) == 200 and sample_indices(5, 0) == []


def test_the_split_summary_is_the_trainers_split():
    names = [f"P{p}_{i}" for p in range(5) for i in range(p + 1)]  # uneven: 1..5 images per patient
    ds = fd.from_arrays(np.zeros((len(names), 4, 4), np.uint8), np.zeros((len(names), 4, 4), bool), names)
    train, test = fd.split(ds, test_fraction=0.2, seed=7)
    s = summarise_split(names, test_fraction=0.2, seed=7)
    assert (s.train_images, s.test_images) == (len(train), len(test))
    assert s.test_patients == len({fd.patient_of(n) for n in test.names}) and s.patients == 5


# ------------------------------------------------------------------------------------ coordinator


@pytest.fixture
def hub(tmp_path, capsys):
    """A federation whose broker files lie in a folder mosquitto may enter (pytest's are 0700)."""
    broker = Path(tempfile.mkdtemp(prefix="fednca-broker-", dir="/tmp"))
    broker.chmod(0o755)
    folder = tmp_path / "fed"
    assert main(["coordinator", "init", str(folder), "--federation", "clinics",
                 "--broker", "mqtt://127.0.0.1:18830", "--broker-dir", str(broker / "mosquitto")]) == 0
    capsys.readouterr()
    yield folder
    shutil.rmtree(broker, ignore_errors=True)


def broker_dir(hub: Path) -> Path:
    return Path(yaml.safe_load((hub / "coordinator.yaml").read_text())["mosquitto"]["folder"])


@needs_passwd
def test_a_fresh_federation_passes(hub, capsys):
    assert main(["coordinator", "check", str(hub)]) == 0
    assert "configuration and the files it names are fine" in capsys.readouterr().out
    assert main(["coordinator", "check", str(hub), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@needs_passwd
def test_the_coordinator_check_reports_every_problem_with_its_fix(hub, capsys):
    box = hub / "keys" / "box.key"
    box.chmod(0o640)
    (broker_dir(hub) / "acl").unlink()
    text = (hub / "coordinator.yaml").read_text().replace("port: 18830", "port: 18831")
    (hub / "coordinator.yaml").write_text(text)
    (hub / "registry.json").write_text("{not json")
    assert main(["coordinator", "check", str(hub), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    by_key = {f["key"]: f for f in report["problems"]}
    assert by_key["keys"]["path"] == str(box) and by_key["keys"]["fix"] == f"chmod 600 {box}"
    assert "18831 differs from the port in broker.url" in by_key["mosquitto.port"]["problem"]
    assert by_key["registry"]["path"] == str(hub / "registry.json")
    missing = [f for f in report["problems"] if f["path"] == str(broker_dir(hub) / "acl")]
    assert missing and "broker-config" in missing[0]["fix"]


@needs_passwd
@root_only
def test_a_broker_file_mosquitto_cannot_read_is_named(hub, capsys):
    passwd = broker_dir(hub) / "passwd"
    os.chown(passwd, 0, 0)
    passwd.chmod(0o600)
    assert main(["coordinator", "check", str(hub)]) == 2
    err = capsys.readouterr().err
    assert f"{passwd}: the 'mosquitto' user cannot read it" in err and f"chgrp mosquitto {passwd}" in err


@needs_passwd
@root_only
def test_a_folder_mosquitto_cannot_enter_is_named(tmp_path, capsys):
    assert main(["coordinator", "init", str(tmp_path / "fed"), "--federation", "clinics",
                 "--broker", "mqtt://127.0.0.1:18830"]) == 0  # broker files under pytest's 0700 folder
    capsys.readouterr()
    assert main(["coordinator", "check", str(tmp_path / "fed"), "--json"]) == 2
    (f,) = json.loads(capsys.readouterr().out)["problems"]
    assert f["key"] == "mosquitto.folder" and "cannot enter" in f["problem"] and f["fix"].startswith("chmod o+x ")


def test_permits_follows_owner_then_group_then_others():
    kw = dict(owner=10, group=20, groups=frozenset({20}))
    assert bp.permits(mode=0o640, uid=30, want="r", **kw) is True  # by group
    assert bp.permits(mode=0o044, uid=10, want="r", **kw) is False  # the owner's bits decide for the owner
    assert bp.permits(mode=0o604, uid=30, groups=frozenset(), owner=10, group=20, want="r") is True
    assert bp.permits(mode=0o000, uid=0, want="w", **kw) is True


def test_the_daemon_check_reads_no_image_it_was_not_asked_to(site):
    tmp_path, data = site
    decoded: list[Path] = []
    from fednca_daemon.preflight_data import check_folder

    def decode(path: Path) -> tuple[int, int]:
        decoded.append(path)
        return fd.decode(path)

    findings, notes, facts = check_folder(tmp_path / "data", skip_bad=False, test_fraction=0.0, seed=0,
                                          images=ImageCheck(sample=3), decode=decode)
    assert findings == [] and facts["decoded"] == 3 and len(decoded) == 6  # image and mask of 3 pairs
    assert dp.check(write(tmp_path, data)).ok


def test_an_unreadable_default_site_key_is_only_a_warning_since_systemd_hands_it_over(tmp_path, monkeypatch):
    monkeypatch.setattr(dp, "open_problem", lambda p: "cannot read it (Permission denied)")
    (f,) = dp._site_key(Path("/etc/fednca/keys"))
    assert f.severity == "warning" and "LoadCredential=" in f.problem
    (f,) = dp._site_key(tmp_path / "keys")
    assert f.severity == "error" and f.path == str(tmp_path / "keys" / "signing.key") and "chown fednca:" in f.fix
