"""The broker files of a federation, written from its ``coordinator.yaml``, owned as they must be.

This is the shell between the coordinator's configuration and :mod:`fednca_broker.mosquitto`:
``init``, ``enroll``, ``revoke`` and ``broker-config`` all end here, so the files mosquitto reads
always agree with the configuration and the registry, and always carry the owners and modes
mosquitto needs (root:mosquitto 0640 in a folder it may enter; see ``mosquitto.secure``).

The TLS material: the federation's CA key lives with the coordinator's keys (``keys/broker-ca.key``,
0600), its certificate beside the configuration (``broker-ca.pem``, what the coordinator and the
sites trust); the broker's folder holds a copy of the CA certificate and the server certificate
and key that mosquitto serves. A server certificate is issued again when the configured names
change or when asked (``--new-server-certificate``); the CA stays, so sites need nothing new.

Run as root on a federation folder that belongs to the coordinator's service user (as
``make install-coordinator`` lays it out), the coordinator's own files are handed back to that user
afterwards, so that the service can still read what root just wrote.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Callable

from fednca import keys as k
from fednca.atomic import write_bytes

from . import mosquitto, regions, tls
from .bridge import bridge_user
from .config import CoordinatorConfig
from .mosquitto import BrokerAccount, MosquittoSettings
from .workers import worker_passwords

log = logging.getLogger("fednca.broker")
Clock = Callable[[], dt.datetime]


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def settings_for(cfg: CoordinatorConfig, *, sites: int, account: BrokerAccount) -> MosquittoSettings:
    """The configured settings, sized for ``sites``, running mosquitto as the account that owns the files."""
    settings = cfg.mosquitto_settings(sites=sites)
    if account.user != settings.user and not settings.run_as_root:
        settings = dataclasses.replace(settings, user=account.user)
    return settings


def ensure_ca(cfg: CoordinatorConfig, *, now: Clock = _utc_now) -> tls.Issued:
    """The federation's CA, made the first time it is needed."""
    if cfg.broker_ca_key.exists() and cfg.broker_ca_cert.exists():
        return tls.Issued(key_pem=cfg.broker_ca_key.read_bytes(), cert_pem=cfg.broker_ca_cert.read_bytes())
    ca = tls.make_ca(federation=cfg.federation.name, now=now())
    cfg.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_bytes(cfg.broker_ca_key, ca.key_pem, mode=0o600)
    write_bytes(cfg.broker_ca_cert, ca.cert_pem, mode=0o644)
    log.info("made the federation's broker CA: %s", cfg.broker_ca_cert)
    return ca


def ensure_server_certificate(cfg: CoordinatorConfig, *, renew: bool = False, now: Clock = _utc_now) -> bool:
    """Issue the broker's certificate when missing, renamed, or asked; True when one was issued."""
    names = tuple(cfg.mosquitto.tls_names)
    folder = cfg.mosquitto_dir
    cert_path = folder / mosquitto.CERT_NAME
    ca = ensure_ca(cfg, now=now)
    if not renew and cert_path.exists() and (folder / mosquitto.KEY_NAME).exists():
        if set(tls.names_of(cert_path.read_bytes())) == set(names) and (folder / mosquitto.CA_NAME).exists():
            return False
    server = tls.make_server_certificate(ca=ca, names=names, now=now())
    mosquitto.write_tls(folder, server_key_pem=server.key_pem, server_cert_pem=server.cert_pem, ca_cert_pem=ca.cert_pem)
    log.info("issued the broker's server certificate for %s", ", ".join(names))
    return True


def write_broker_files(cfg: CoordinatorConfig, *, registry: k.Registry, coordinator_password: str,
                       site_passwords: dict[str, str] | None = None, renew_certificate: bool = False,
                       observer_passwords: dict[str, str] | None = None, now: Clock = _utc_now) -> list[Path]:
    """Write every broker file from the configuration; returns the folders mosquitto cannot enter.

    ``site_passwords`` None keeps the sites' accounts already in the password file (their
    passwords are only stored hashed), dropping those no longer enrolled; the coordinator's
    password is set again from its secret.
    """
    account = mosquitto.broker_account(cfg.mosquitto.user)
    settings = settings_for(cfg, sites=len(registry.sites), account=account)
    Path(settings.folder).mkdir(parents=True, exist_ok=True)
    if cfg.mosquitto.tls_names:
        ensure_server_certificate(cfg, renew=renew_certificate, now=now)
    observers = {**(observer_passwords or {}), **bridge_passwords(cfg),
                 **worker_passwords(cfg)}  # service accounts, passwords in secrets/
    if site_passwords is not None or not settings.password_path.exists():
        mosquitto.write_password_file(settings.password_path, {settings.coordinator_user: coordinator_password,
                                                               **observers, **(site_passwords or {})})
    else:
        keep = {settings.coordinator_user, *observers}
        for user in password_users(settings.password_path):
            if user not in keep and user not in registry.sites:
                mosquitto.remove_user(settings.password_path, user)
        for user, password in {settings.coordinator_user: coordinator_password, **observers}.items():
            mosquitto.set_password(settings.password_path, user, password)
    return update_access(cfg, registry=registry, account=account)


def bridge_passwords(cfg: CoordinatorConfig) -> dict[str, str]:
    """The central broker accounts of the regional bridges (``regions.json``), with their passwords."""
    out = {}
    for name in regions.read_regions(cfg.folder).regions:
        path = regions.password_path(cfg.folder, name)
        if path.is_file():
            out[bridge_user(name)] = path.read_text().strip()
    return out


def bridges(cfg: CoordinatorConfig, registry: k.Registry) -> dict[str, tuple[str, ...]]:
    """Region -> its enrolled sites, for the central broker's ACL."""
    return regions.read_regions(cfg.folder).bridges(registry.sites)


def password_users(path: Path) -> list[str]:
    return [line.split(":", 1)[0] for line in path.read_text().splitlines() if ":" in line]


def update_access(cfg: CoordinatorConfig, *, registry: k.Registry, account: BrokerAccount | None = None) -> list[Path]:
    """ACL and conf again for the enrolled sites (limits grow with them), owners and modes restored."""
    account = account or mosquitto.broker_account(cfg.mosquitto.user)
    settings = settings_for(cfg, sites=len(registry.sites), account=account)
    mosquitto.write_acl_and_conf(settings, sites=registry.sites, account=None, bridges=bridges(cfg, registry))
    blocked = mosquitto.secure(settings, account)
    hand_over(cfg)
    return blocked


def hand_over(cfg: CoordinatorConfig) -> None:
    """Give the coordinator's files to the federation folder's owner when root wrote them."""
    if os.geteuid() != 0:
        return
    st = cfg.folder.stat()
    if st.st_uid == 0:
        return
    skip = {cfg.mosquitto_dir.resolve()}
    for root, dirs, files in os.walk(cfg.folder):
        here = Path(root)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skip]
        for name in [*dirs, *files]:
            os.chown(here / name, st.st_uid, st.st_gid, follow_symlinks=False)
