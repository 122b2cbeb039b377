"""The federation's own certificate authority and the broker's server certificate.

A federation served over ``mqtts://`` needs a certificate that every site can check without
trusting anyone else: ``fednca coordinator init --tls-name NAME ...`` makes a private CA (its key
stays in the coordinator's ``keys/`` folder, 0600), signs one server certificate for the names and
addresses the operator gives (DNS names and IP addresses become the matching subjectAltName
entries, which is what TLS clients check; the common name is ignored by them), and the enrolment
bundle carries the CA certificate. The certificates are made with the ``cryptography`` library:
no openssl command lines to assemble, and the extensions are typed objects that tests read back.

Keys are ECDSA P-256 (fast on a board, accepted by every TLS 1.2 stack). The functions here are
pure apart from the clock and randomness, both passed in or drawn by the library; writing the PEM
files and their owners is the caller's business (:mod:`fednca_broker.mosquitto`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fednca.errors import ConfigError

CA_DAYS = 3650  # the CA outlives many server certificates: sites keep trusting it
SERVER_DAYS = 825  # renew with `fednca coordinator broker-config DIR --new-server-certificate`
_BACKDATE = dt.timedelta(minutes=5)  # tolerate a site whose clock is a little behind


@dataclass(frozen=True)
class Issued:
    """A private key and its certificate, both as PEM bytes."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


def check_names(names: list[str] | tuple[str, ...], *, field: str = "--tls-name") -> tuple[str, ...]:
    """The names a server certificate is issued for: DNS names or IP addresses, at least one."""
    if not names:
        raise ConfigError(field, "give at least one DNS name or IP address that sites connect to")
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name) or "/" in name:
            raise ConfigError(field, f"{name!r} is neither a DNS name nor an IP address")
        if _ip(name) is None:
            labels = name.rstrip(".").split(".")
            if not all(label and len(label) <= 63 and all(c.isalnum() or c in "-*" for c in label)
                       for label in labels):  # fmt: skip
                raise ConfigError(field, f"{name!r} is neither a DNS name nor an IP address")
        if _ip(name) is not None and _ip(name).is_unspecified:  # type: ignore[union-attr]
            raise ConfigError(field, f"{name} is a bind-all address; no client connects to it")
        if name not in out:
            out.append(name)
    return tuple(out)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def make_ca(*, federation: str, now: dt.datetime, days: int = CA_DAYS) -> Issued:
    """A self-signed CA that may sign server certificates only (path length 0)."""
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"FedNCA {federation} broker CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return Issued(key_pem=_pem(key), cert_pem=cert.public_bytes(serialization.Encoding.PEM))


def make_server_certificate(*, ca: Issued, names: tuple[str, ...] | list[str], now: dt.datetime,
                            days: int = SERVER_DAYS) -> Issued:
    """A TLS server certificate for ``names`` (DNS names and IPs), signed by ``ca``."""
    names = check_names(list(names))
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    ca_cert = ca.certificate
    key = _key()
    alt: list[x509.GeneralName] = []
    for n in names:
        ip = _ip(n)
        alt.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                       critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )  # fmt: skip
    return Issued(key_pem=_pem(key), cert_pem=cert.public_bytes(serialization.Encoding.PEM))


def names_of(cert_pem: bytes) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is valid for, as text."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(str(v) for v in san.get_values_for_type(x509.DNSName)) + tuple(
        str(v) for v in san.get_values_for_type(x509.IPAddress))


def covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a client connecting to ``host`` finds it among ``names`` (exact match; IPs compared as IPs)."""
    ip = _ip(host)
    if ip is not None:
        return any(_ip(n) == ip for n in names)
    return host.rstrip(".").lower() in {n.rstrip(".").lower() for n in names if _ip(n) is None}
