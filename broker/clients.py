"""The coordinator's broker connections: its own session, and the read-only observers of the views."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from fednca.errors import ConfigError

from .config import OBSERVERS, CoordinatorConfig

def broker_client(cfg: CoordinatorConfig, *, client_id: str | None = None, clean_start: bool = False) -> Any:
    """An MQTT client with the coordinator's credentials (``client_id``: a second session, unbound only).

    The read-only views connect with :func:`observer_client` instead; with the ids bound a second
    session on the coordinator's account would be the coordinator's own, so it is refused.
    """
    from fednca.transport.mqtt import MqttClient, TLSOptions

    if client_id is not None and client_id != cfg.client_id and cfg.mosquitto.bind_client_ids:
        raise ConfigError("mosquitto.bind_client_ids", "is true, so mosquitto gives every client of the coordinator's "
                          "account the same client id: a second view would cut the coordinator off (and a clean start "
                          "would end its session); connect with an observer account (observer_client) instead")

    b = cfg.broker
    tls = TLSOptions(b.ca_file, b.cert_file, b.key_file) if b.url.startswith("mqtts://") else None
    return MqttClient(url=b.url, client_id=client_id or cfg.client_id, username=b.username,
                      password=read_secret(cfg), tls=tls, keepalive=b.keepalive,
                      max_packet_size=b.max_packet_size, protocol=b.protocol, clean_start=clean_start)


def observer_client(cfg: CoordinatorConfig, user: str, **options: Any) -> Any:
    """A read-only MQTT client on observer account ``user`` (one of ``OBSERVERS``), clean start.

    With the ids bound its client id is its user name (mosquitto would make it so anyway): a
    second client of the same observer takes that observer's session over, never the
    coordinator's. Unbound, each process gets an id of its own. ``options`` go to the client
    (reconnect delays).
    """
    from fednca.transport.mqtt import MqttClient, TLSOptions

    if user not in OBSERVERS:
        raise ConfigError("observer", f"{user!r} is not one of the observer accounts {OBSERVERS}")
    path = cfg.observer_password_path(user)
    if not path.exists():
        raise ConfigError(f"observer {user}", f"{path} is missing: this federation was made before its "
                          f"read-only views had accounts; run  fednca coordinator broker-config {cfg.folder}  "
                          "and reload mosquitto")
    b = cfg.broker
    tls = TLSOptions(b.ca_file, b.cert_file, b.key_file) if b.url.startswith("mqtts://") else None
    client_id = user if cfg.mosquitto.bind_client_ids else f"{user}-{os.getpid()}"
    return MqttClient(url=b.url, client_id=client_id, username=user,
                      password=read_secret(cfg, path, key=f"observer {user}"), tls=tls, keepalive=b.keepalive,
                      max_packet_size=b.max_packet_size, protocol=b.protocol, clean_start=True, **options)


def read_secret(cfg: CoordinatorConfig, path: Path | None = None, *, key: str = "broker.password_file") -> str:
    """A password file of the coordinator's folder: present, not empty, readable by its owner only."""
    path = path or cfg.password_path
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as e:
        raise ConfigError(key, f"{path}: cannot read ({e.strerror})") from None
    if mode & 0o077:
        raise ConfigError(key, f"{path} is readable by group or others "
                          f"(mode {stat.S_IMODE(mode):04o}); fix it with: chmod 600 {path}")
    if not text:
        raise ConfigError(key, f"{path} is empty")
    return text
