"""``fednca daemon``: run the edge daemon of one site, or check its configuration.

    fednca daemon [--config /etc/fednca/daemon.yaml]     run (systemd starts it this way)
    fednca daemon --check-config FILE                    validate, check files, print the effective config

A bad configuration exits with status 2 and lists every problem with its key and the file.
SIGTERM and SIGINT stop the daemon: the running chunk ends (or is abandoned) within 2 s, the
checkpoint stays, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Callable

import yaml

from fednca.errors import FedNCAError
from fednca.keys import read_coordinator_public, read_site_keys

from . import config as dc

log = logging.getLogger("fednca.daemon")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=dc.DEFAULT_PATH,
                   help=f"configuration file (default {dc.DEFAULT_PATH})")
    p.add_argument("--check-config", type=Path, metavar="FILE",
                   help="validate FILE, check the files it names, print the effective configuration and exit")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    if args.check_config is not None:
        return check_config(args.check_config)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr)
    return run_daemon(args.config)


def file_checks(cfg: dc.DaemonConfig) -> list[tuple[str, str]]:
    """Problems with the files the configuration names (keys, data, TLS, state folder)."""
    problems: list[tuple[str, str]] = []
    for where, read in (("keys.site", lambda: read_site_keys(cfg.keys.site)),
                        ("keys.coordinator", lambda: read_coordinator_public(cfg.keys.coordinator))):
        try:
            read()
        except FedNCAError as e:
            problems.append((where, str(e)))
    if cfg.data.folder is not None:
        for sub in ("images", "masks"):
            if not (cfg.data.folder / sub).is_dir():
                problems.append(("data.folder", f"{cfg.data.folder / sub}: folder missing"))
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(cfg.broker.tls, name)
        if path is not None and not path.is_file():
            problems.append((f"broker.tls.{name}", f"{path}: no such file"))
    parent = cfg.state_dir if cfg.state_dir.exists() else cfg.state_dir.parent
    if not parent.is_dir():
        problems.append(("state_dir", f"{parent}: no such folder"))
    return problems


def check_config(path: Path) -> int:
    cfg = dc.load(path)
    print(f"# effective configuration of {path}")
    print(yaml.safe_dump(dc.to_dict(cfg), sort_keys=False, default_flow_style=False), end="")
    problems = file_checks(cfg)
    if problems:
        raise dc.DaemonConfigError(str(path), problems)
    print(f"# {path}: configuration and the files it names are fine")
    return 0


def build_client(cfg: dc.DaemonConfig):  # -> MqttClient (paho imported only here)
    from fednca.transport.base import Will
    from fednca.transport.mqtt import MqttClient, TLSOptions
    from fednca.topics import Topics

    from .telemetry import OFFLINE

    tls = None
    t = cfg.broker.tls
    if any(v is not None for v in (t.ca_file, t.cert_file, t.key_file)):
        tls = TLSOptions(ca_file=_s(t.ca_file), cert_file=_s(t.cert_file), key_file=_s(t.key_file))
    return MqttClient(url=cfg.broker.url, client_id=f"fednca-{cfg.federation}-{cfg.site}",
                      username=cfg.mqtt_username, password=cfg.broker.password, tls=tls,
                      will=Will(Topics(cfg.federation).status(cfg.site), OFFLINE, qos=1, retain=True),
                      keepalive=cfg.broker.keepalive_s)


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


def run_daemon(path: Path, *, probe: Callable[[str], None] | None = None) -> int:
    """Load the configuration and keys, connect, and run until SIGTERM or SIGINT."""
    from fednca.notify import Notifier
    from .service import Service

    cfg = dc.load(path)
    service = Service(config=cfg, client=build_client(cfg), site_keys=read_site_keys(cfg.keys.site),
                      coordinator=read_coordinator_public(cfg.keys.coordinator), notifier=Notifier(),
                      **({"probe": probe} if probe is not None else {}))

    def stop(signum: int, frame: object) -> None:
        service.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return service.run()
