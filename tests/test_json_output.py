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
