"""The daemon's YAML configuration: every problem named with its key and the file, credentials,
and ``fednca daemon --check-config``."""

import os
from pathlib import Path

import pytest
import yaml

from daemon_support import Federation
from fednca_app.cli import main
from fednca_daemon import config as dc

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "systemd" / "daemon.example.yaml"


def minimal():
    return {"site": "site-a", "federation": "fed", "broker": {"url": "mqtt://127.0.0.1:1883"},
            "data": {"folder": "/srv/data"}}


def test_minimal_configuration_takes_the_documented_defaults():
    cfg = dc.parse(minimal(), env={})
    assert cfg.state_dir == Path("/var/lib/fednca") and cfg.cpu.duty_cycle == 0.5 and cfg.cpu.threads == 1
    assert cfg.training.low_memory is True and cfg.training.chunk_s == 5.0 and cfg.gates.max_temperature_c == 75.0
    assert cfg.keys.site == Path("/etc/fednca/keys") and cfg.mqtt_username == "site-a"
    assert cfg.seed == dc.parse(minimal(), env={}).seed and isinstance(cfg.seed, int)
    with pytest.raises(AttributeError):
        cfg.site = "other"  # frozen


def test_every_problem_is_listed_with_its_key_and_the_file():
    data = minimal()
    data.update(colour="blue", state_dir=5)
    data["cpu"] = {"duty_cycle": 1.5, "threads": "two"}
    data["gates"] = {"windows": ["22:00-06:00", "later"], "max_temperature_c": True}
    data["training"] = {"chunk_s": 0.0, "delta_dtype": "int8", "low_memory": "yes"}
    data["broker"] = {"url": "http://x", "keepalive_s": 1}
    del data["site"]
    with pytest.raises(dc.DaemonConfigError) as err:
        dc.parse(data, source="/etc/fednca/daemon.yaml", env={})
    keys = [k for k, _ in err.value.problems]
    assert keys == ["colour", "site", "broker.keepalive_s", "state_dir", "cpu.threads", "cpu.duty_cycle",
                    "gates.max_temperature_c", "gates.windows", "training.chunk_s", "training.low_memory",
                    "training.delta_dtype"]
    text = str(err.value)
    assert text.startswith("/etc/fednca/daemon.yaml: 11 problem(s):")
    assert "unknown key" in text and "[1]: 'later' is not a window" in text and "must be a number" in text


def test_cross_checks():
    data = minimal()
    data["broker"] = {"url": "mqtt://h:1883", "password": "x", "password_file": "/p", "tls": {"ca_file": "/ca"}}
    data["data"] = {"folder": "/d", "phantom": {"site": 1}}
    data["gates"] = {"max_temperature_c": 30, "temperature_hysteresis_c": 40}
    with pytest.raises(dc.DaemonConfigError) as err:
        dc.parse(data, env={})
    assert [k for k, _ in err.value.problems] == ["broker.tls", "broker.password", "data",
                                                  "gates.temperature_hysteresis_c"]
    data = minimal()
    data["broker"] = {"url": "mqtt://user:pw@h:1883"}
    with pytest.raises(dc.DaemonConfigError, match="broker.url: .*credentials separately"):
        dc.parse(data, env={})


def test_relative_paths_are_taken_from_the_file_folder(tmp_path):
    data = minimal()
    data["data"] = {"folder": "data"}
    cfg = dc.parse(data, base=tmp_path, env={})
    assert cfg.data.folder == tmp_path / "data"


def test_secrets_from_systemd_credentials(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "mqtt-password").chmod(0o600)
    (creds / "signing.key").write_text("whatever")
    data = minimal()
    data["keys"] = {"coordinator": "${CREDENTIALS_DIRECTORY}/coordinator"}
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(data))
    cfg = dc.load(conf, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.broker.password == "s3cret" and cfg.broker.password_file == creds / "mqtt-password"
    assert cfg.keys.coordinator == creds / "coordinator"
    assert cfg.keys.site == creds, "the default key folder gives way to the credential"
    data["keys"]["site"] = "/srv/keys"
    conf.write_text(yaml.safe_dump(data))
    assert dc.load(conf, env={"CREDENTIALS_DIRECTORY": str(creds)}).keys.site == Path("/srv/keys")
    data["keys"] = {"site": "$CREDENTIALS_DIRECTORY"}
    with pytest.raises(dc.DaemonConfigError, match=r"keys.site: refers to \$CREDENTIALS_DIRECTORY, which is not set"):
        dc.parse(data, env={})


def test_an_inline_password_in_a_world_readable_file_is_refused(tmp_path):
    data = minimal()
    data["broker"]["password"] = "pw"
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(data))
    os.chmod(conf, 0o644)
    with pytest.raises(dc.DaemonConfigError, match="broker.password: .*anyone can read it"):
        dc.load(conf, env={})
    os.chmod(conf, 0o640)
    assert dc.load(conf, env={}).broker.password == "pw"


def test_unreadable_or_broken_files_name_the_file(tmp_path):
    with pytest.raises(dc.DaemonConfigError, match="missing.yaml: 1 problem"):
        dc.load(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: [unclosed")
    with pytest.raises(dc.DaemonConfigError, match="not valid YAML"):
        dc.load(bad, env={})
    bad.write_text("- a list\n")
    with pytest.raises(dc.DaemonConfigError, match=r"\(top level\): must be a mapping"):
        dc.load(bad, env={})


def test_the_example_file_is_a_valid_configuration():
    cfg = dc.load(EXAMPLE, env={})
    assert cfg.site == "clinic-a" and cfg.data.test_fraction == 0.1 and cfg.broker.tls.ca_file is not None


def test_the_reference_lists_every_key_with_its_default():
    rows = {k: d for k, d, _ in dc.reference()}
    assert rows["site"] == "required" and rows["cpu.duty_cycle"] == "0.5" and rows["gates.windows"] == "[]"
    assert rows["training.low_memory"] == "true" and rows["broker.tls.ca_file"] == "null"
    assert rows["data.phantom.count"] == "64" and rows["data.phantom"] == "(section)"
    assert len(rows) == 49  # 38 keys in 11 sections
    assert rows["inference.export"] == "true"
    assert rows["training.trainer"] == "numpy"


def test_the_trainer_is_numpy_or_torch(tmp_path):
    conf = tmp_path / "daemon.yaml"
    fed = Federation(tmp_path)
    assert fed.config().training.trainer == "numpy"
    assert fed.config(training={"trainer": "torch"}).training.trainer == "torch"
    conf.write_text(yaml.safe_dump(fed.config_data(training={"trainer": "tensorflow"})))
    with pytest.raises(dc.DaemonConfigError, match="training.trainer: .*numpy.*torch"):
        dc.load(conf, env={})


def test_check_config_says_when_the_torch_trainer_has_no_pytorch(tmp_path):
    from fednca_daemon.preflight import trainer_findings

    fed = Federation(tmp_path)
    nothing = lambda name: None  # an environment without PyTorch
    assert trainer_findings(fed.config(), find_spec=nothing) == []  # numpy: nothing to find
    [finding] = trainer_findings(fed.config(training={"trainer": "torch"}), find_spec=nothing)
    assert finding.key == "training.trainer" and "not installed" in finding.problem and "--with-torch" in finding.fix
    assert trainer_findings(fed.config(training={"trainer": "torch"})) == []  # this venv has it


def test_check_config_prints_the_effective_configuration(tmp_path, capsys):
    fed = Federation(tmp_path)
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(fed.config_data()))
    os.chmod(conf, 0o600)
    assert main(["daemon", "--check-config", str(conf)]) == 0
    out = capsys.readouterr().out
    effective = yaml.safe_load(out)
    assert effective["broker"]["password"] == "***" and effective["training"]["chunk_s"] == 0.2
    assert effective["cpu"]["duty_cycle"] == 1.0 and "configuration and the files it names are fine" in out


def test_check_config_fails_on_bad_keys_and_on_missing_files(tmp_path, capsys):
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump({**minimal(), "cpu": {"duty_cycle": 0}}))
    assert main(["daemon", "--check-config", str(conf)]) == 2
    assert "cpu.duty_cycle: must be > 0.0" in capsys.readouterr().err
    conf.write_text(yaml.safe_dump({**minimal(), "keys": {"site": str(tmp_path / "nokeys")}}))
    assert main(["daemon", "--check-config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "keys.site: " in err and "no such key file" in err and "data.folder: /srv/data/images" in err


def test_the_documentation_lists_every_key():
    text = (ROOT / "docs" / "daemon.md").read_text()
    missing = [key for key, _, _ in dc.reference() if f"| `{key}` |" not in text and f"| **`{key}`** |" not in text]
    assert missing == []


def test_a_password_file_others_can_read_is_refused_with_the_fix(tmp_path):
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    data = minimal()
    data["broker"] = {"url": "mqtt://h:1883", "password_file": str(secret)}
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(data))
    with pytest.raises(dc.DaemonConfigError, match=f"chmod 600 {secret}"):
        dc.load(conf, env={})
    secret.chmod(0o600)
    assert dc.load(conf, env={}).broker.password == "s3cret"


def test_read_parses_without_touching_secrets_and_load_still_refuses_them(tmp_path):
    data = minimal()
    data["broker"] = {"url": "mqtt://h:1883", "password_file": str(tmp_path / "absent")}
    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(data))
    cfg, mode = dc.read(conf, env={})
    assert cfg.broker.password is None and cfg.broker.password_file == tmp_path / "absent" and mode & 0o777
    with pytest.raises(dc.DaemonConfigError, match="broker.password_file: .*absent: cannot read"):
        dc.load(conf, env={})
