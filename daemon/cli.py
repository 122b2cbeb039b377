"""``fednca daemon``: run the edge daemon of one site, or check its configuration.

    fednca daemon [--config /etc/fednca/daemon.yaml]     run (systemd starts it this way)
    fednca daemon --check-config FILE [--check-images all|sample N] [--json]
                                                         check everything the run will need

``--check-config`` prints the effective configuration, then every problem that would stop the
daemon or fail at run time (keys, credentials, state folder, images: preflight.py), each with its
key, the file and the fix; the exit status is 0 when there is none, else 2.
SIGTERM and SIGINT stop the daemon: the running chunk ends (or is abandoned) within 2 s, the
checkpoint stays, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from fednca.errors import ConfigError
from fednca.keys import read_coordinator_public, read_site_keys

from . import config as dc

if TYPE_CHECKING:  # the checks load image decoding: only --check-config imports them
    from .preflight_data import ImageCheck

log = logging.getLogger("fednca.daemon")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=dc.DEFAULT_PATH,
                   help=f"configuration file (default {dc.DEFAULT_PATH})")
    p.add_argument("--check-config", type=Path, metavar="FILE",
                   help="validate FILE, check every file it names (credentials, keys, state folder, images), "
                        "print the effective configuration and every problem, and exit: 0 fine, 2 not")
    p.add_argument("--check-images", nargs="+", metavar="all|sample N", default=["all"],
                   help="with --check-config: decode every image/mask pair (all, the default) or N of them, "
                        "evenly spread (sample N); every pair's size is checked either way")
    p.add_argument("--json", action="store_true", help="with --check-config: print one JSON object")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    if args.check_config is not None:
        return check_config(args.check_config, images=image_check(args.check_images), as_json=args.json)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(message)s", stream=sys.stderr)
    return run_daemon(args.config)


def image_check(words: list[str] | None) -> ImageCheck:
    """``--check-images all`` or ``--check-images sample N``."""
    from .preflight_data import ImageCheck

    if not words or words == ["all"]:
        return ImageCheck()
    if len(words) == 2 and words[0] == "sample" and words[1].isdigit() and int(words[1]) > 0:
        return ImageCheck(sample=int(words[1]))
    raise ConfigError("--check-images", f"must be 'all' or 'sample N' with N > 0, got {' '.join(words)!r}")


def check_config(path: Path, *, images: ImageCheck | None = None, as_json: bool = False) -> int:
    """Print the effective configuration and every problem found (preflight.py); 0 when fine, else 2."""
    from . import preflight
    from .preflight_data import ImageCheck

    report = preflight.check(path, images=images or ImageCheck())
    effective = report.facts.get("effective")  # absent when the keys themselves are wrong
    if as_json:
        print(json.dumps({"effective": None, **report.to_dict()}, sort_keys=True))
        return 0 if report.ok else 2
    if effective is not None:
        print(f"# effective configuration of {path}")
        print(yaml.safe_dump(effective, sort_keys=False, default_flow_style=False), end="")
    lines = report.lines()
    for line in lines[:-1]:  # notes on stdout, problems on stderr
        print(line, file=sys.stdout if line.startswith("#") else sys.stderr)
    print(lines[-1], file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2


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
