"""Regional brokers bridged to the central one: the generated text, the region record, the command.

The brokers themselves run in tests/test_bridge_mosquitto.py; here the files are checked as text,
with the central side's ACL evaluated the way mosquitto evaluates it (a message passes when one
line of the user's block matches its topic).
"""

from __future__ import annotations

import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from cryptography import x509

from fednca import topics
from fednca.keys import SiteKeys, read_registry
from fednca_app.cli import main
from fednca_broker.bridge import Bridge, bridge_rules, directions, render_bridge, render_regional_acl
from fednca_broker.mosquitto import render_acl
from fednca_broker.regions import Region, RegionError, Regions, read_regions, write_regions

FED = "clinics"
needs_passwd = pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")


def block(acl: str, user: str) -> list[tuple[str, str]]:
    """The (access, topic filter) lines of ``user``'s block in an ACL file."""
    lines, inside = [], False
    for line in acl.splitlines():
        if line.startswith("user "):
            inside = line == f"user {user}"
        elif inside and line.startswith("topic "):
            _, access, pattern = line.split(" ")
            lines.append((access, pattern))
    return lines


def grants(acl: str, user: str, access: str, topic: str) -> bool:
    return any(a == access and topics.matches(p, topic) for a, p in block(acl, user))


# ------------------------------------------------------------------------------------ the text


def test_the_bridge_section_forwards_exactly_the_sites_topics_at_qos_1_with_a_lasting_session():
    text = render_bridge(Bridge(federation=FED, region="eu", address="hub.example:1883", password="pw"))
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("topic ")] == [
        "topic fednca/clinics/updates/+ out 1", "topic fednca/clinics/status/+ out 1",
        "topic fednca/clinics/round in 1", "topic fednca/clinics/model in 1", "topic fednca/clinics/receipts/+ in 1",
    ]  # fmt: skip
    for line in ("connection bridge-eu", "address hub.example:1883", "cleansession false", "remote_username bridge-eu",
                 "remote_clientid bridge-eu", "remote_password pw", "try_private true"):
        assert line in lines
    assert not any(line.startswith("bridge_cafile") for line in lines)  # plain MQTT: no TLS lines


def test_an_mqtts_bridge_checks_the_central_certificate_and_its_name():
    text = render_bridge(Bridge(federation=FED, region="eu", address="hub.example:8883", password="pw",
                                cafile="/etc/fednca/eu/central-ca.pem"))  # fmt: skip
    lines = text.splitlines()
    assert "bridge_cafile /etc/fednca/eu/central-ca.pem" in lines and "bridge_insecure false" in lines
    assert "bridge_tls_version tlsv1.2" in lines


def test_every_topic_a_site_uses_crosses_the_bridge_the_way_it_flows():
    site = topics.rules(role=topics.SITE, user="s1", federation=FED)
    crossing = {(d.way, topics.Topics(FED).prefix + d.pattern) for d in directions(FED)}
    for rule in site:
        way = "out" if rule.access == "write" else "in"
        assert any(w == way and topics.matches(p, rule.topic_filter) for w, p in crossing), rule
    assert not any(topics.matches(p, topics.Topics(FED).events) for _, p in crossing)  # no site reads events


def test_the_central_acl_lets_a_bridge_forward_the_sites_topics_and_read_only_its_own_receipts():
    acl = render_acl(FED, coordinator_user="coordinator", sites=["s1", "s2", "s3"], bridges={"eu": ["s1", "s2"]})
    t = topics.Topics(FED)
    for site in ("s1", "s2"):
        assert grants(acl, "bridge-eu", "write", t.updates(site)) and grants(acl, "bridge-eu", "write", t.status(site))
        assert grants(acl, "bridge-eu", "read", t.receipts(site))
    assert not grants(acl, "bridge-eu", "read", t.receipts("s3"))  # another region's receipts stay away
    assert grants(acl, "bridge-eu", "read", t.round) and grants(acl, "bridge-eu", "read", t.model)
    assert not grants(acl, "bridge-eu", "write", t.round) and not grants(acl, "bridge-eu", "write", t.receipts("s1"))
    assert not grants(acl, "bridge-eu", "read", t.events) and not grants(acl, "bridge-eu", "read", t.updates("s1"))
    assert not grants(acl, "bridge-eu", "write", t.events) and not grants(acl, "bridge-eu", "write", t.model)
    assert all("%" not in p for _, p in block(acl, "bridge-eu"))  # its own lines, no per-user pattern
    assert len(block(acl, "bridge-eu")) == 5 + 2  # short: mosquitto reads a long block slowly
    assert grants(acl, "bridge-eu", "write", "$SYS/broker/connection/bridge-eu/state")
    assert block(acl, "s1") == [(r.access, r.topic_filter) for r in topics.rules(role=topics.SITE, user="s1",
                                                                                  federation=FED)]
    with pytest.raises(Exception, match="bridge-eu"):
        render_acl(FED, coordinator_user="coordinator", sites=["bridge-eu"], bridges={"eu": []})
    empty = render_acl(FED, coordinator_user="coordinator", sites=["s1"], bridges={"eu": iter([])})
    assert grants(empty, "bridge-eu", "read", t.round) and not grants(empty, "bridge-eu", "read", t.receipts("s1"))


def test_the_regional_acl_has_the_sites_own_rules_and_no_one_else():
    acl = render_regional_acl(FED, region="eu", sites=["s2", "s1"])
    assert [line for line in acl.splitlines() if line.startswith("user ")] == ["user s1", "user s2"]
    assert not grants(acl, "s1", "write", topics.Topics(FED).updates("s2"))
    assert bridge_rules(FED, region="eu", sites=[])[0].topic_filter.startswith("$SYS/")


def test_a_bridge_refuses_values_that_mosquitto_conf_would_misread():
    with pytest.raises(Exception, match="password"):
        Bridge(federation=FED, region="eu", address="hub:1883", password="two words")
    with pytest.raises(Exception, match="region"):
        Bridge(federation=FED, region="EU!", address="hub:1883", password="pw")


# ---------------------------------------------------------------------------------- the record


def region(name: str, *sites: str) -> Region:
    return Region(name=name, url="mqtt://r:1883", address="0.0.0.0", port=1883, central="mqtt://hub:1883",
                  folder=f"/srv/{name}", sites=tuple(sorted(sites)))  # fmt: skip


def test_a_site_belongs_to_one_region_and_moving_it_takes_it_out_of_the_other(tmp_path):
    regions = Regions().put(region("eu", "s1", "s2")).put(region("us", "s3"))
    moved = regions.assign("us", add=["s2"], remove=["s3"])
    assert moved.regions["eu"].sites == ("s1",) and moved.regions["us"].sites == ("s2",)
    assert moved.region_of("s2") == "us" and moved.region_of("s3") is None
    assert moved.drop_site("s1").regions["eu"].sites == ()
    assert moved.bridges(["s2"]) == {"eu": (), "us": ("s2",)}  # only enrolled sites reach the ACL
    with pytest.raises(RegionError, match="two regions"):
        Regions(regions={"eu": region("eu", "s1"), "us": region("us", "s1")})
    with pytest.raises(RegionError, match="no region"):
        regions.assign("asia", add=["s1"])
    write_regions(tmp_path, moved)
    assert read_regions(tmp_path) == moved and read_regions(tmp_path / "none") == Regions()
    (tmp_path / "regions.json").write_text('{"version": 1, "regions": [{"name": "eu", "colour": 1}]}')
    with pytest.raises(RegionError, match="colour"):
        read_regions(tmp_path)


# ---------------------------------------------------------------------------------- the command


def passwd_lines(path) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in path.read_text().splitlines() if ":" in line}


def enroll(fed, site, *extra) -> int:
    return main(["coordinator", "enroll", str(fed), site, bytes(SiteKeys.generate().verify_key).hex(), *extra])


@pytest.fixture
def broker_dir():
    """A folder the mosquitto user may enter (pytest's are 0700), for ``coordinator check``."""
    folder = Path(tempfile.mkdtemp(prefix="fednca-broker-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@needs_passwd
def test_bridge_command_writes_both_sides_and_enroll_revoke_keep_them_in_step(tmp_path, broker_dir, capsys):
    fed = tmp_path / "fed"
    assert main(["coordinator", "init", str(fed), "--federation", FED, "--quorum", "2", "--broker-dir",
                 str(broker_dir / "mosquitto"), "--broker", "mqtt://127.0.0.1:18830"]) == 0  # fmt: skip
    for site in ("s1", "s2"):
        assert enroll(fed, site) == 0
    assert main(["coordinator", "bridge", str(fed), "eu", "--site", "s3"]) == 2  # new region: no --broker
    assert main(["coordinator", "bridge", str(fed), "eu", "--broker", "mqtt://127.0.0.1:18831", "--site", "s3"]) == 2
    assert "not enrolled" in capsys.readouterr().err
    assert main(["coordinator", "bridge", str(fed), "eu", "--broker", "mqtt://127.0.0.1:18831", "--site", "s2"]) == 0
    assert "broker.url: mqtt://127.0.0.1:18831" in capsys.readouterr().out
    capsys.readouterr()
    assert enroll(fed, "s3", "--region", "eu", "--json") == 0
    assert '"broker": "mqtt://127.0.0.1:18831"' in capsys.readouterr().out  # the site is told its region
    folder = fed / "regions" / "eu"
    central, regional = passwd_lines(broker_dir / "mosquitto" / "passwd"), passwd_lines(folder / "passwd")
    assert regional == {"s2": central["s2"], "s3": central["s3"]}  # the same hashes: the same passwords
    assert "bridge-eu" in central
    assert stat.S_IMODE((fed / "secrets" / "bridge-eu-mqtt-password").stat().st_mode) == 0o600
    conf = (folder / "mosquitto.conf").read_text()
    assert "listener 18831 127.0.0.1" in conf and "address 127.0.0.1:18830" in conf
    assert f"remote_password {(fed / 'secrets' / 'bridge-eu-mqtt-password').read_text().strip()}" in conf
    acl = (broker_dir / "mosquitto" / "acl").read_text()
    t = topics.Topics(FED)
    assert grants(acl, "bridge-eu", "read", t.receipts("s3")) and not grants(acl, "bridge-eu", "read", t.receipts("s1"))
    assert main(["coordinator", "check", str(fed)]) == 0  # the ACL is what broker-config would write
    assert main(["coordinator", "broker-config", str(fed)]) == 0
    assert "bridge-eu" in passwd_lines(broker_dir / "mosquitto" / "passwd")
    assert (broker_dir / "mosquitto" / "acl").read_text() == acl
    assert enroll(fed, "bridge-eu") == 2  # a site may not take the bridge's account

    assert main(["coordinator", "revoke", str(fed), "s3"]) == 0
    assert set(passwd_lines(folder / "passwd")) == {"s2"} and "user s3" not in (folder / "acl").read_text()
    assert not grants((broker_dir / "mosquitto" / "acl").read_text(), "bridge-eu", "read", t.receipts("s3"))
    assert main(["coordinator", "bridge", str(fed), "eu", "--remove-site", "s2"]) == 0
    assert read_regions(fed).regions["eu"].sites == () and passwd_lines(folder / "passwd") == {}
    assert list(read_registry(fed / "registry.json").sites) == ["s1", "s2"]


@needs_passwd
def test_an_mqtts_federation_gives_the_region_the_central_ca_and_a_certificate_its_sites_trust(tmp_path, capsys):
    fed = tmp_path / "fed"
    assert main(["coordinator", "init", str(fed), "--federation", FED, "--broker", "mqtts://hub.example:8883",
                 "--tls-name", "hub.example"]) == 0  # fmt: skip
    assert enroll(fed, "s1") == 0
    assert main(["coordinator", "bridge", str(fed), "eu", "--broker", "mqtts://eu.example:8883", "--tls-name",
                 "eu.example", "--site", "s1", "--central", "mqtts://10.0.0.1:8883"]) == 2  # fmt: skip
    assert "does not name 10.0.0.1" in capsys.readouterr().err  # the bridge would refuse the hub's certificate
    assert main(["coordinator", "bridge", str(fed), "eu", "--broker", "mqtts://eu.example:8883",
                 "--tls-name", "eu.example", "--site", "s1"]) == 0  # fmt: skip
    folder = fed / "regions" / "eu"
    conf = (folder / "mosquitto.conf").read_text().splitlines()
    assert f"bridge_cafile {folder / 'central-ca.pem'}" in conf and "address hub.example:8883" in conf
    assert (folder / "central-ca.pem").read_bytes() == (fed / "broker-ca.pem").read_bytes()
    assert "listener 8883 0.0.0.0" in conf and f"certfile {folder / 'server.pem'}" in conf
    ca = x509.load_pem_x509_certificate((fed / "broker-ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())
    assert server.issuer == ca.subject  # signed by the federation's CA: the sites' ca.crt already trusts it
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["eu.example"]
