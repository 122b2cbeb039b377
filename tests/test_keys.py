import hashlib
import json
import os
import stat

import pytest
from nacl.signing import SigningKey

from fednca import keys as k
from fednca_app.cli import main


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_key_id_is_the_first_eight_bytes_of_the_public_keys_sha256():
    public = SigningKey(bytes(range(32))).verify_key
    assert k.key_id(public) == hashlib.sha256(bytes(public)).hexdigest()[:16]
    assert k.key_id_bytes(public) == hashlib.sha256(bytes(public)).digest()[:8]
    assert k.key_id(bytes(32)) == "66687aadf862bd77"  # sha256 of 32 zero bytes


def test_site_keys_round_trip_with_private_file_0600_in_a_0700_folder(tmp_path):
    folder = tmp_path / "keys"
    keys = k.SiteKeys.generate()
    k.write_site_keys(folder, keys)
    assert mode(folder) == 0o700
    assert mode(folder / "signing.key") == 0o600
    assert mode(folder / "signing.pub") == 0o644
    assert k.read_site_keys(folder).signing == keys.signing
    assert k.read_verify_key(folder / "signing.pub") == keys.verify_key
    assert (folder / "signing.pub").read_text() == f"fednca-ed25519-public {bytes(keys.verify_key).hex()}\n"


def test_coordinator_keys_round_trip_and_public_half(tmp_path):
    keys = k.CoordinatorKeys.generate()
    k.write_coordinator_keys(tmp_path / "c", keys)
    back = k.read_coordinator_keys(tmp_path / "c")
    assert back.signing == keys.signing and bytes(back.box) == bytes(keys.box)
    assert mode(tmp_path / "c" / "box.key") == 0o600
    public = k.read_coordinator_public(tmp_path / "c")
    assert public == keys.public
    assert public.box_id == k.key_id(keys.box.public_key)


def test_group_readable_private_key_is_refused_with_the_fix(tmp_path):
    k.write_site_keys(tmp_path / "s", k.SiteKeys.generate())
    path = tmp_path / "s" / "signing.key"
    os.chmod(path, 0o640)
    with pytest.raises(k.KeyFileError, match=f"chmod 600 {path}"):
        k.read_site_keys(tmp_path / "s")
    os.chmod(path, 0o600)
    k.read_site_keys(tmp_path / "s")


def test_refuses_to_replace_keys_unless_forced(tmp_path):
    first = k.SiteKeys.generate()
    k.write_site_keys(tmp_path / "s", first)
    with pytest.raises(k.KeyFileError, match="already exists"):
        k.write_site_keys(tmp_path / "s", k.SiteKeys.generate())
    assert k.read_site_keys(tmp_path / "s").signing == first.signing
    second = k.SiteKeys.generate()
    k.write_site_keys(tmp_path / "s", second, force=True)
    assert k.read_site_keys(tmp_path / "s").signing == second.signing


def test_refuses_an_open_key_folder(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with pytest.raises(k.KeyFileError, match=f"chmod 700 {folder}"):
        k.write_site_keys(folder, k.SiteKeys.generate())


def test_labels_keep_key_kinds_apart(tmp_path):
    k.write_coordinator_keys(tmp_path / "c", k.CoordinatorKeys.generate())
    with pytest.raises(k.KeyFileError, match="not a fednca-ed25519-public file"):
        k.read_verify_key(tmp_path / "c" / "box.pub")
    with pytest.raises(k.KeyFileError, match="not a fednca-x25519-public file"):
        k.read_box_public_key(tmp_path / "c" / "signing.pub")


@pytest.mark.parametrize("text, match", [
    ("fednca-ed25519-public 00ff\n", "64 lowercase hex"),
    ("fednca-ed25519-public " + "AB" * 32 + "\n", "64 lowercase hex"),
    ("", "not a fednca-ed25519-public"),
    ("x" * 300, "too long"),
    ("\xff\xfe", "not a text key file"),
])
def test_malformed_public_key_files_are_refused(tmp_path, text, match):
    path = tmp_path / "signing.pub"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(k.KeyFileError, match=match):
        k.read_verify_key(path)


def test_missing_key_file_and_mismatched_pair(tmp_path):
    with pytest.raises(k.KeyFileError, match="no such key file"):
        k.read_site_keys(tmp_path)
    k.write_site_keys(tmp_path / "s", k.SiteKeys.generate())
    other = bytes(k.SiteKeys.generate().verify_key).hex()
    (tmp_path / "s" / "signing.pub").write_text(f"fednca-ed25519-public {other}\n")
    with pytest.raises(k.KeyFileError, match="does not match signing.key"):
        k.read_site_keys(tmp_path / "s")


def test_registry_enrol_revoke_and_file_round_trip(tmp_path):
    a, b = k.SiteKeys.generate(), k.SiteKeys.generate()
    reg = k.Registry().enrol("clinic-a", a.verify_key).enrol("clinic-b", b.verify_key)
    assert reg.site_of_key(a.key_id) == "clinic-a"
    assert reg.verify_key("clinic-b") == b.verify_key and reg.verify_key("nobody") is None
    path = tmp_path / "registry.json"
    k.write_registry(path, reg)
    back = k.read_registry(path)
    assert back.sites == reg.sites
    assert json.loads(path.read_text())["sites"]["clinic-a"] == bytes(a.verify_key).hex()
    assert "clinic-a" not in back.revoke("clinic-a").sites
    with pytest.raises(k.RegistryError, match="not enrolled"):
        back.revoke("clinic-z")


HEX = "11" * 32


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"),
    ('{"format": "fednca-registry/1", "sites": {}, "extra": 1}', "exactly the fields"),
    ('{"format": "fednca-registry/2", "sites": {}}', "format must be"),
    ('{"format": "fednca-registry/1", "sites": []}', "'sites' must map"),
    ('{"format": "fednca-registry/1", "sites": {"a": "12"}}', "sites.a: the key must be"),
    ('{"format": "fednca-registry/1", "sites": {"a": 5}}', "sites.a: the key must be"),
    (f'{{"format": "fednca-registry/1", "sites": {{"Bad/Site": "{HEX}"}}}}', "not a valid id"),
    (f'{{"format": "fednca-registry/1", "sites": {{"a": "{HEX}", "a": "{HEX}"}}}}', "appears twice"),
    (f'{{"format": "fednca-registry/1", "sites": {{"a": "{HEX}", "b": "{HEX}"}}}}', "share one key"),
])
def test_registry_loads_strictly(tmp_path, text, match):
    path = tmp_path / "registry.json"
    path.write_text(text)
    with pytest.raises(k.RegistryError, match=match):
        k.read_registry(path)


def test_cli_generates_and_shows_keys(tmp_path, capsys):
    assert main(["keys", "generate", "--role", "coordinator", "--out", str(tmp_path / "c")]) == 0
    generated = capsys.readouterr().out
    public = k.read_coordinator_public(tmp_path / "c")
    assert public.verify_id in generated and public.box_id in generated
    assert main(["keys", "show", str(tmp_path / "c"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["keys"]["box.pub"]["public"] == bytes(public.box).hex()
    assert shown["keys"]["signing.pub"]["key_id"] == public.verify_id


def test_cli_reports_refusals_as_one_line_errors(tmp_path, capsys):
    assert main(["keys", "generate", "--role", "site", "--out", str(tmp_path / "s")]) == 0
    assert main(["keys", "generate", "--role", "site", "--out", str(tmp_path / "s")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "show", str(tmp_path / "empty")]) == 2
