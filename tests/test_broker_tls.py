"""The federation's CA and server certificate, the listener flags' agreement, and the listener limits."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from fednca.errors import ConfigError
from fednca_broker import tls
from fednca_broker.listener import check_config, plan_listener
from fednca_broker.mosquitto import limits_for

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def ca():
    return tls.make_ca(federation="clinics", now=NOW)


def test_the_ca_signs_certificates_only_and_lasts_years(ca):
    cert = ca.certificate
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=tls.CA_DAYS)
    assert cert.issuer == cert.subject and "clinics" in cert.subject.rfc4514_string()
    assert b"PRIVATE KEY" in ca.key_pem and b"ENCRYPTED" not in ca.key_pem


def test_the_server_certificate_names_dns_names_and_ips_as_sans(ca):
    server = tls.make_server_certificate(ca=ca, names=["clinic-hub.example", "10.0.0.5", "::1"], now=NOW)
    cert = server.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["clinic-hub.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("::1")]
    assert tls.names_of(server.cert_pem) == ("clinic-hub.example", "10.0.0.5", "::1")
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH])
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_before_utc < NOW < cert.not_valid_after_utc
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=tls.SERVER_DAYS)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca.certificate)  # raises if the CA did not sign it


def test_a_server_certificate_never_outlives_its_ca(ca):
    late = NOW + dt.timedelta(days=tls.CA_DAYS - 10)
    cert = tls.make_server_certificate(ca=ca, names=["hub"], now=late).certificate
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_another_ca_does_not_vouch_for_it(ca):
    other = tls.make_ca(federation="clinics", now=NOW)
    cert = tls.make_server_certificate(ca=ca, names=["hub"], now=NOW).certificate
    with pytest.raises(Exception):
        cert.verify_directly_issued_by(other.certificate)


@pytest.mark.parametrize("names", [[], ["bad name"], ["0.0.0.0"], ["a/b"], ["under_score.example"]])
def test_names_that_cannot_be_in_a_certificate_are_refused(names):
    with pytest.raises(ConfigError) as err:
        tls.check_names(names)
    assert err.value.field == "--tls-name"


def test_covers_compares_ips_as_ips_and_names_without_case():
    names = ("Hub.Example", "10.0.0.5", "::1")
    assert tls.covers(names, "hub.example") and tls.covers(names, "0:0::1") and tls.covers(names, "10.0.0.5")
    assert not tls.covers(names, "10.0.0.6") and not tls.covers(names, "other.example")


# ----------------------------------------------------------------------------- the flags of init


def test_a_public_tls_url_with_a_bind_all_listener():
    plan = plan_listener(broker="mqtts://clinic-hub.example:8883", listen="0.0.0.0:8883",
                         tls_names=["clinic-hub.example", "10.0.0.5"])
    assert (plan.url, plan.address, plan.port) == ("mqtts://clinic-hub.example:8883", "0.0.0.0", 8883)
    assert plan.tls_names == ("clinic-hub.example", "10.0.0.5")


def test_defaults_listen_on_loopback_for_a_loopback_url_and_everywhere_otherwise():
    assert plan_listener(broker="mqtt://127.0.0.1:1884").address == "127.0.0.1"
    assert plan_listener(broker="mqtt://hub.example").address == "0.0.0.0"
    assert plan_listener(broker="mqtts://hub.example", tls_names=["hub.example"]).port == 8883


@pytest.mark.parametrize(
    "kw, flag, words",
    [
        ({"broker": "mqtt://0.0.0.0:1883"}, "--broker", "--listen 0.0.0.0:1883"),
        ({"broker": "mqtts://[::]:8883", "tls_names": ["hub"]}, "--broker", "not one sites can reach"),
        ({"broker": "mqtts://hub.example:8883"}, "--tls-name", "at least one"),
        ({"broker": "mqtts://hub.example:8883", "tls_names": ["10.0.0.5"]}, "--tls-name", "--tls-name hub.example"),
        ({"broker": "mqtt://hub.example:1883", "tls_names": ["hub.example"]}, "--tls-name", "mqtts://"),
        ({"broker": "mqtts://hub.example:8883", "listen": "0.0.0.0:1883", "tls_names": ["hub.example"]},
         "--listen", "differs"),
        ({"broker": "mqtt://hub.example", "listen": "hub.example:1883"}, "--listen", "ADDRESS:PORT"),
        ({"broker": "http://hub"}, "--broker", "scheme"),
    ],
)
def test_contradictory_flags_are_errors_naming_the_flag(kw, flag, words):
    with pytest.raises(ConfigError) as err:
        plan_listener(**kw)
    assert err.value.field == flag and words in err.value.why


@pytest.mark.parametrize(
    "kw, key",
    [
        ({"url": "mqtts://hub:8883", "port": 8883, "tls_names": ()}, "mosquitto.tls_names"),
        ({"url": "mqtt://hub:1883", "port": 1883, "tls_names": ("hub",)}, "mosquitto.tls_names"),
        ({"url": "mqtts://hub:8883", "port": 1883, "tls_names": ("hub",)}, "mosquitto.port"),
        ({"url": "mqtt://0.0.0.0:1883", "port": 1883, "tls_names": ()}, "broker.url"),
    ],
)
def test_the_configuration_file_is_held_to_the_same_rules(kw, key):
    with pytest.raises(ConfigError) as err:
        check_config(**kw)
    assert err.value.field == key
    check_config(url="mqtts://hub:8883", port=8883, tls_names=("hub",))


def test_listener_limits_grow_with_the_sites():
    assert limits_for(0) == (1000, 20)
    assert limits_for(5) == (1000, 20)
    assert limits_for(30) == (3100, 30)
    assert limits_for(500) == (50100, 500)
    assert limits_for(5000)[1] == 1000
    with pytest.raises(ConfigError):
        limits_for(-1)
