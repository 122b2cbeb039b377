"""Every reporting command has --json, with the same field types: ids as strings, sizes as integer
bytes, times as unix seconds (floats)."""

import json

from fednca_app.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_keys_generate_and_show_print_the_same_json(tmp_path, capsys):
    made = _json(capsys, ["keys", "generate", "--role", "coordinator", "--out", str(tmp_path / "k"), "--json"])
    shown = _json(capsys, ["keys", "show", str(tmp_path / "k"), "--json"])
    assert made == shown and set(shown["keys"]) == {"signing.pub", "box.pub"}
    assert all(isinstance(v["key_id"], str) and isinstance(v["public"], str) for v in shown["keys"].values())


def test_wire_sizes_are_integer_bytes(capsys):
    sizes = _json(capsys, ["wire", "--json"])
    assert sizes["preset"] == "fednca"
    assert all(isinstance(v, int) for k, v in sizes.items() if k != "preset")


def test_daemon_check_config_json_is_the_effective_configuration(tmp_path, capsys):
    import os

    import yaml

    from daemon_support import Federation

    conf = tmp_path / "daemon.yaml"
    conf.write_text(yaml.safe_dump(Federation(tmp_path).config_data()))
    os.chmod(conf, 0o600)
    report = _json(capsys, ["daemon", "--check-config", str(conf), "--json"])
    assert report["ok"] is True and report["problems"] == [] and report["config"] == str(conf)
    assert report["effective"]["broker"]["password"] == "***" and report["effective"]["training"]["chunk_s"] == 0.2
