"""mosquitto.conf, ACL and password files: rendered text, written files, and a real mosquitto."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time

import pytest

from fednca import topics
from fednca.atomic import write_text
from fednca.errors import ConfigError
from fednca.topics import Topics
from fednca.transport import ConnectRefused
from fednca.transport.mqtt import MqttClient, TLSOptions
from fednca_broker import mosquitto as mq
from fednca_broker.mosquitto import MosquittoSettings, TLSListener, render_acl, render_conf
from mosquitto_fixture import free_port

WAIT = 5.0
needs_passwd = pytest.mark.skipif(
    shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed"
)


def settings(**kw) -> MosquittoSettings:
    return MosquittoSettings(**{"federation": "fed", "folder": "/srv/fed", **kw})


def directives(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_conf_defaults():
    lines = directives(render_conf(settings()))
    for expected in [
        "allow_anonymous false",
        "password_file /srv/fed/passwd",
        "acl_file /srv/fed/acl",
        "persistence true",
        "persistence_location /srv/fed/data/",
        "max_packet_size 1048576",
        "persistent_client_expiration 7d",
        "listener 1883 127.0.0.1",
    ]:
        assert expected in lines
    assert "user root" not in lines and not any(line.startswith("cafile") for line in lines)


def test_conf_tls_only_and_root():
    tls = TLSListener(cafile="/etc/ca.pem", certfile="/etc/srv.pem", keyfile="/etc/srv.key",
                      port=8883, address="0.0.0.0", require_certificate=True)  # fmt: skip
    lines = directives(render_conf(settings(plain_listener=False, tls=tls, run_as_root=True)))
    assert "user root" in lines
    assert not any(line.startswith("listener 1883") for line in lines)
    at = lines.index("listener 8883 0.0.0.0")
    assert lines[at + 1 :] == [
        "cafile /etc/ca.pem",
        "certfile /etc/srv.pem",
        "keyfile /etc/srv.key",
        "require_certificate true",
        "tls_version tlsv1.2",
    ]


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"federation": "Bad/Fed"}, None),
        ({"port": 0}, "port"),
        ({"folder": "/srv/my fed"}, "folder"),
        ({"address": "1.2.3.4\nuser root"}, "address"),
        ({"plain_listener": False}, "plain_listener"),
        ({"max_packet_size": 0}, "max_packet_size"),
    ],
)
def test_invalid_settings_name_the_field(kw, field):
    with pytest.raises((ConfigError, topics.TopicError)) as err:
        settings(**kw)
    if field is not None:
        assert err.value.field == field


def parse_acl(text: str) -> dict[str, set[tuple[str, str]]]:
    blocks: dict[str, set[tuple[str, str]]] = {}
    user = None
    for line in directives(text):
        words = line.split()
        if words[0] == "user":
            user = words[1]
            blocks[user] = set()
        else:
            assert words[0] == "topic" and user is not None, line
            blocks[user].add((words[1], words[2]))
    return blocks


def test_acl_is_the_rule_table():
    text = render_acl("fed", coordinator_user="coordinator", sites=["s2", "s1", "s1"])
    blocks = parse_acl(text)
    assert list(blocks) == ["coordinator", "s1", "s2"]
    for user, role in [("coordinator", topics.COORDINATOR), ("s1", topics.SITE), ("s2", topics.SITE)]:
        rules = topics.rules(role=role, user=user, federation="fed")
        assert blocks[user] == {(r.access, r.topic_filter) for r in rules}
    assert ("write", "fednca/fed/updates/s1") in blocks["s1"]
    assert not any("%" in f or f.endswith("#") for block in blocks.values() for _, f in block)


def test_acl_refuses_a_site_named_like_the_coordinator():
    with pytest.raises(ConfigError, match="coordinator"):
        render_acl("fed", coordinator_user="coordinator", sites=["coordinator"])


def test_missing_mosquitto_passwd_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mq.shutil, "which", lambda name: None)
    with pytest.raises(mq.MosquittoError, match="mosquitto_passwd not found"):
        mq.write_password_file(tmp_path / "passwd", {"coordinator": "pw"})
    assert not (tmp_path / "passwd").exists()


@needs_passwd
def test_password_file_is_hashed_and_private(tmp_path):
    path = tmp_path / "passwd"
    mq.write_password_file(path, {"coordinator": "secret-1", "s1": "secret-2"})
    text = path.read_text()
    assert "secret" not in text
    assert [line.split(":")[0] for line in text.splitlines()] == ["coordinator", "s1"]
    assert path.stat().st_mode & 0o007 == 0
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    mq.set_password(path, "s2", "secret-3")
    mq.remove_user(path, "s1")
    assert [line.split(":")[0] for line in path.read_text().splitlines()] == ["coordinator", "s2"]


@needs_passwd
def test_password_with_a_line_break_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="s1"):
        mq.write_password_file(tmp_path / "passwd", {"s1": "a\nb"})


def connect(mosquitto, user, *, password=None, **kw) -> MqttClient:
    client = MqttClient(url=kw.pop("url", mosquitto.url), client_id=kw.pop("client_id", user),
                        username=user, password=password or mosquitto.passwords[user], **kw)  # fmt: skip
    assert client.connect(WAIT)
    return client


def test_enrolling_a_site_takes_effect_on_reload(mosquitto):
    """Enrolment: add the password, write the ACL again with the new site, SIGHUP mosquitto."""
    s = mosquitto.settings
    mq.set_password(s.password_path, "site-c", "site-c-secret")
    acl = render_acl(s.federation, coordinator_user="coordinator", sites=["site-a", "site-b", "site-c"])
    write_text(s.acl_path, acl)
    with pytest.raises(ConnectRefused):  # mosquitto has not read the files yet
        connect(mosquitto, "site-c", password="site-c-secret")
    mosquitto.reload()
    coordinator = connect(mosquitto, "coordinator")
    coordinator.subscribe(Topics("fed").all_updates)
    deadline = time.monotonic() + WAIT
    while True:  # SIGHUP is handled asynchronously
        try:
            new_site = connect(mosquitto, "site-c", password="site-c-secret")
            break
        except ConnectRefused:
            assert time.monotonic() < deadline, "site-c still refused after the reload"
            time.sleep(0.02)
    try:
        new_site.publish(Topics("fed").updates("site-c"), b"hello").result(WAIT)
        message = coordinator.receive(WAIT)
        assert message is not None and message.payload == b"hello"
    finally:
        new_site.disconnect()
        coordinator.disconnect()


def test_persistence_keeps_queued_messages_across_a_restart(mosquitto):
    t = Topics("fed")
    coordinator = connect(mosquitto, "coordinator")
    coordinator.subscribe(t.all_updates)
    coordinator.disconnect()
    site = connect(mosquitto, "site-a")
    site.publish(t.updates("site-a"), b"kept").result(WAIT)
    site.disconnect()
    mosquitto.restart()
    back = connect(mosquitto, "coordinator")
    try:
        message = back.receive(WAIT)
        assert message is not None and message.payload == b"kept"
    finally:
        back.disconnect()


def _make_certificates(folder) -> dict[str, str]:
    """A throw-away CA and a server certificate for 127.0.0.1 (EC keys: fast)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test ca")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.pem", "-days", "2", "-extfile", "ext")  # fmt: skip
    return {name: str(folder / name) for name in ("ca.pem", "srv.pem", "srv.key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_listener_with_password(mosquitto_factory, tmp_path):
    certs = _make_certificates(tmp_path)
    port = free_port()
    tls = TLSListener(cafile=certs["ca.pem"], certfile=certs["srv.pem"], keyfile=certs["srv.key"],
                      port=port, address="127.0.0.1")  # fmt: skip
    mosquitto = mosquitto_factory(tls=tls)
    url = f"mqtts://127.0.0.1:{port}"
    client = connect(mosquitto, "site-a", url=url, tls=TLSOptions(ca_file=certs["ca.pem"]))
    try:
        client.publish(Topics("fed").status("site-a"), b"{}", retain=True).result(WAIT)
        assert client.protocol == "5"
    finally:
        client.disconnect()
    untrusting = MqttClient(url=url, client_id="x", username="site-a",
                            password=mosquitto.passwords["site-a"])  # fmt: skip
    try:
        assert untrusting.connect(0.5) is False  # the test CA is not among the system's
    finally:
        untrusting.disconnect()


def test_without_a_mosquitto_user_the_files_stay_ours_and_mosquitto_is_told_so(tmp_path, monkeypatch, caplog):
    def no_such_user(name):
        raise KeyError(name)

    monkeypatch.setattr(mq.pwd, "getpwnam", no_such_user)
    account = mq.broker_account("mosquitto")
    assert account == mq.BrokerAccount.current()
    assert "no 'mosquitto' user" in caplog.text
    conf = render_conf(dataclasses.replace(settings(), user=account.user))
    assert f"user {account.user}" in directives(conf)


@needs_passwd
def test_secure_gives_the_files_their_modes_and_names_a_folder_mosquitto_cannot_enter(tmp_path):
    s = settings(folder=str(tmp_path / "broker"))
    mq.write_files(s, coordinator_password="pw", site_passwords={"s1": "pw1"})
    (tmp_path / "broker" / "acl").chmod(0o600)
    me = mq.BrokerAccount.current()
    assert mq.secure(s, me) == []  # our own folders: we may enter them
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "broker").iterdir()}
    assert modes == {"acl": 0o640, "passwd": 0o640, "mosquitto.conf": 0o640, "data": 0o700}
    stranger = mq.BrokerAccount(user="nobody-here", uid=65533, gid=65533, owner=me.uid)
    tmp_path.chmod(0o700)
    assert tmp_path in mq.secure(s, stranger)  # a user of its own could not pass tmp_path
