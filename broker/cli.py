"""``fednca coordinator``: set up a federation folder, enrol and revoke sites, run the coordinator.

    fednca coordinator init DIR --federation NAME [--broker mqtt://127.0.0.1:1883] [--quorum 0.6]
                                [--listen ADDRESS:PORT] [--tls-name NAME ...] [--broker-dir DIR]
    fednca coordinator enroll DIR SITE KEYFILE|HEX [--out FOLDER] [--replace]
    fednca coordinator revoke DIR SITE
    fednca coordinator broker-config DIR [--new-server-certificate]
    fednca coordinator run DIR [--log-level info]
    fednca coordinator show DIR [--json]
    fednca coordinator check DIR [--json]                 every problem that would stop run (exit 2)

The folder layout and every configuration key are described in ``broker/config.py`` and
docs/coordinator.md. A configuration problem is one error listing every bad key (exit 2).

``--broker`` is the address sites are told, ``--listen`` what mosquitto binds; ``mqtts://`` makes
the federation's CA and the broker's certificate for the ``--tls-name`` names (broker/listener.py
says which combinations are refused). ``broker-config`` writes every broker file again from
coordinator.yaml (after editing its ``mosquitto`` section, or to renew the server certificate).

``run`` handles SIGTERM and SIGINT by finishing the current step and disconnecting, re-reads the
site registry when ``enroll`` or ``revoke`` changes it, and exits 0 once ``max_rounds`` rounds are
done. Under systemd (``Type=notify``) it sends READY=1 once connected, WATCHDOG=1 from its loop
and STOPPING=1 when it stops. Test hook, not for operators: with ``FEDNCA_COORDINATOR_KILL_AFTER=ACTION[:N]`` in its
environment, ``run`` kills itself with SIGKILL right after performing the N-th (default first)
action of that name (``StoreUpdate``, ``SaveState``, ``Ack``, ``SendReceipt``, ``LogEvent``,
``Announce``, ``SaveModel``, ``LogRound``, ``CloseRound``, ``LogFinished``), so crash tests can
stop it at an exact point of a round.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from fednca import keys as k
from fednca.atomic import write_text
from fednca.config import PRESETS, preset, train_preset
from fednca.errors import ConfigError, FedNCAError
from fednca.notify import Notifier
from fednca.topics import check_id

from . import deploy, mosquitto
from .config import (CONFIG_NAME, OBSERVERS, BrokerConfig, CoordinatorConfig, FederationConfig, MosquittoConfig,
                     load_config, to_yaml_dict)
from .listener import check_config, plan_listener
from .rounds import RoundConfig
from .store import RoundStore

KILL_ENV = "FEDNCA_COORDINATOR_KILL_AFTER"
BUNDLE_CA = "ca.crt"  # the name the daemon's configuration expects (/etc/fednca/ca.crt)


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = sub.add_parser("init", help="create a federation folder: keys, configuration, registry, broker files")
    init.add_argument("folder", type=Path)
    init.add_argument("--federation", required=True, help="the federation id (a-z 0-9 _ -)")
    init.add_argument("--broker", default=BrokerConfig.url,
                      help="the broker address sites connect to, mqtt:// or mqtts:// (default %(default)s)")
    init.add_argument("--listen", metavar="ADDRESS:PORT",
                      help="what mosquitto binds (default: 127.0.0.1 for a loopback --broker, else 0.0.0.0; its port)")
    init.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                      help="a DNS name or IP address of the broker's certificate (repeat; needed by mqtts://)")
    init.add_argument("--broker-dir", type=Path,
                      help="folder of the broker's files, one mosquitto may enter (default: DIR/mosquitto)")
    init.add_argument("--broker-data-dir", type=Path, help="mosquitto's persistence folder (default: BROKER_DIR/data)")
    init.add_argument("--quorum", "--sites-quorum", dest="quorum", default="0.6",
                      help="sites needed to close a round: a fraction of the enrolled (0.6) or a count (3)")
    init.add_argument("--preset", choices=sorted(PRESETS), default="fednca", help="model preset")
    init.add_argument("--model", type=Path, help="start from this model folder instead of fresh weights")
    init.add_argument("--seed", type=int, default=0, help="seed of the fresh initial weights")
    init.add_argument("--max-rounds", type=int, default=FederationConfig.max_rounds)
    enroll = sub.add_parser("enroll", help="enrol a site: its public signing key and broker password")
    enroll.add_argument("folder", type=Path)
    enroll.add_argument("site", help="the site id, also its broker user name")
    enroll.add_argument("key", help="the site's signing.pub file, or its 64 hex digits")
    enroll.add_argument("--replace", action="store_true", help="give an enrolled site a new key and password")
    enroll.add_argument("--out", type=Path, help="also write what the site needs into this folder")
    enroll.add_argument("--json", action="store_true", help="print one JSON object")
    revoke = sub.add_parser("revoke", help="revoke a site: drop its key and its broker account")
    revoke.add_argument("folder", type=Path)
    revoke.add_argument("site")
    run_p = sub.add_parser("run", help="run the federation's coordinator")
    run_p.add_argument("folder", type=Path)
    run_p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run_p.add_argument("--poll", type=float, default=1.0, help="seconds between clock ticks when idle")
    conf = sub.add_parser("broker-config", help="write every broker file again from coordinator.yaml")
    conf.add_argument("folder", type=Path)
    conf.add_argument("--new-server-certificate", action="store_true",
                      help="issue the broker's TLS certificate again (same CA: sites need nothing new)")
    back = sub.add_parser("rollback", help="go back to an earlier global model, in a new round (coordinator stopped)")
    back.add_argument("folder", type=Path, metavar="DIR", help="the federation folder")
    back.add_argument("--to-round", type=int, required=True, metavar="N", help="train on from the model of round N")
    check = sub.add_parser("check", help="check everything the coordinator and its broker need; exit 2 on a problem")
    check.add_argument("folder", type=Path)
    check.add_argument("--json", action="store_true", help="print one JSON object")
    show = sub.add_parser("show", help="print the federation's configuration, sites and round")
    show.add_argument("folder", type=Path)
    show.add_argument("--json", action="store_true", help="print one JSON object (times as unix seconds)")
    show.add_argument("--rounds", type=int, default=5, metavar="N", help="the latest N rounds' Dice (default 5)")


def run(args: argparse.Namespace) -> int:
    actions = {"init": _init, "enroll": _enroll, "revoke": _revoke, "broker-config": _broker_config, "run": _run,
               "rollback": _rollback, "show": _show, "check": _check}  # fmt: skip
    return actions[args.action](args)


# ------------------------------------------------------------------------------------------ init


def _quorum(text: str) -> RoundConfig:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("--quorum", f"must be a fraction like 0.6 or a count like 3, got {text!r}") from None
    try:
        if value.is_integer() and value >= 1 and "." not in text:
            return RoundConfig(quorum_count=int(value))
        return RoundConfig(quorum_fraction=value)
    except ConfigError as e:
        raise ConfigError("--quorum", e.why) from None


def _init(args: argparse.Namespace) -> int:
    folder: Path = args.folder.resolve()  # the broker files name paths: make them absolute
    if (folder / CONFIG_NAME).exists():
        raise FedNCAError(f"{folder / CONFIG_NAME}: already exists; this folder holds a federation")
    plan = plan_listener(broker=args.broker, listen=args.listen, tls_names=args.tls_name)
    url = plan.url
    broker_dir = "mosquitto" if args.broker_dir is None else str(args.broker_dir.resolve())
    data_dir = None if args.broker_data_dir is None else str(args.broker_data_dir.resolve())
    listener = MosquittoConfig(address=plan.address, port=plan.port, tls_names=plan.tls_names, folder=broker_dir,
                               data_folder=data_dir)  # fmt: skip
    ca_file = str(folder / "broker-ca.pem") if plan.tls_names else None
    model_cfg, tensors = _initial_model(args)
    federation = FederationConfig(
        name=check_id(args.federation, what="federation"), rounds=_quorum(args.quorum), max_rounds=args.max_rounds,
        model=model_cfg, seed=args.seed, train=train_preset(model_cfg.preset),
    )  # fmt: skip
    cfg = CoordinatorConfig(folder=folder, federation=federation, broker=BrokerConfig(url=url, ca_file=ca_file),
                            mosquitto=listener)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    _write_secret(cfg.password_path, password)
    coordinator_keys = k.CoordinatorKeys.generate()
    k.write_coordinator_keys(cfg.keys_dir, coordinator_keys, force=True)  # no federation yet: nothing to lose
    blocked = deploy.write_broker_files(cfg, registry=k.Registry(), coordinator_password=password, site_passwords={},
                                        observer_passwords=_observer_passwords(cfg))
    RoundStore(root=cfg.store_root, federation=federation.name).save_model(1, tensors)
    k.write_registry(cfg.registry_path, k.Registry())
    header = (f"# FedNCA coordinator of federation {federation.name!r}. Every key is described in "
              "docs/coordinator.md.\n# Changes take effect when the coordinator starts again; "
              "round settings apply from the next round.\n")
    write_text(cfg.config_path, header + yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
    load_config(cfg.config_path)  # what was written must read back
    deploy.hand_over(cfg)
    pub = coordinator_keys.public
    print(f"federation {federation.name!r} set up in {folder}")
    print(f"  coordinator signing key id {pub.verify_id}, box key id {pub.box_id}")
    print(f"  broker files in {cfg.mosquitto_dir}: run  mosquitto -c {cfg.mosquitto_settings().conf_path}")
    if plan.tls_names:
        print(f"  TLS on {plan.address}:{plan.port} for {', '.join(plan.tls_names)}; sites trust {cfg.broker_ca_cert}")
    elif plan.address != "127.0.0.1":
        print(f"  warning: plain MQTT on {plan.address}:{plan.port}: passwords cross the network unencrypted; "
              "prefer --broker mqtts://HOST:8883 --tls-name HOST")
    _warn_blocked(blocked)
    print(f"  next: fednca coordinator enroll {folder} SITE SITE_SIGNING_PUB, then fednca coordinator run {folder}")
    return 0


def _initial_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    if args.model is not None:
        from fednca import modelfile

        model_cfg, tensors, _ = modelfile.load(args.model)
        return model_cfg, tensors
    from fednca.model import build, tensors as model_tensors  # torch: once, to make the first weights

    model_cfg = preset(args.preset)
    return model_cfg, {n: t.numpy() for n, t in model_tensors(build(model_cfg, seed=args.seed)).items()}


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_text(path, text + "\n", mode=0o600)


def _read_secret(cfg: CoordinatorConfig, path: Path | None = None, *, key: str = "broker.password_file") -> str:
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


def _observer_passwords(cfg: CoordinatorConfig) -> dict[str, str]:
    """Each observer account's password, made (0600, beside the coordinator's) where missing:
    ``init`` makes them, ``broker-config`` adds them to a federation made before they existed."""
    passwords = {}
    for user in OBSERVERS:
        path = cfg.observer_password_path(user)
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24))
        passwords[user] = _read_secret(cfg, path, key=f"observer {user}")
    return passwords


# -------------------------------------------------------------------------------- enroll, revoke


def _rewrite_acl(cfg: CoordinatorConfig, registry: k.Registry) -> None:
    """ACL and conf for the sites now enrolled, with the owners and modes mosquitto needs."""
    _warn_blocked(deploy.update_access(cfg, registry=registry))


def _warn_blocked(blocked: list[Path]) -> None:
    for parent in blocked:
        print(f"  warning: mosquitto's user cannot enter {parent}, so it cannot read the broker files: "
              f"chmod o+x {parent}, or set mosquitto.folder in coordinator.yaml and run broker-config",
              file=sys.stderr)


def _enroll(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    site = check_id(args.site, what="site")
    if site == cfg.broker.username or site in OBSERVERS:
        raise FedNCAError(f"site {site!r}: that is the broker user name of the coordinator or of its views")
    registry = k.read_registry(cfg.registry_path)
    if site in registry.sites and not args.replace:
        raise FedNCAError(f"site {site!r} is already enrolled; pass --replace to give it a new key and password")
    enrolled = registry.enrol(site, k.verify_key_from_text(args.key))
    password = secrets.token_urlsafe(24)
    mosquitto.set_password(cfg.mosquitto_settings().password_path, site, password)
    _rewrite_acl(cfg, enrolled)
    k.write_registry(cfg.registry_path, enrolled)  # last: the site counts from here on
    deploy.hand_over(cfg)
    pub = k.read_coordinator_public(cfg.keys_dir)
    sheet = {
        "federation": cfg.federation.name, "site": site, "site_key_id": k.key_id(enrolled.sites[site]),
        "broker": cfg.broker.url, "mqtt_username": site, "mqtt_password": password,
        "coordinator_signing_key": bytes(pub.verify).hex(), "coordinator_signing_key_id": pub.verify_id,
        "coordinator_box_key": bytes(pub.box).hex(), "coordinator_box_key_id": pub.box_id,
        "update_dtype": cfg.federation.update_dtype,
    }  # fmt: skip
    if cfg.broker.ca_file is not None:
        sheet["broker_ca_sha256"] = hashlib.sha256(Path(cfg.broker.ca_file).read_bytes()).hexdigest()
    if args.out is not None:
        _write_bundle(args.out, cfg, password)
        sheet["bundle"] = str(args.out)
    if args.json:
        print(json.dumps(sheet, sort_keys=True))
    else:
        print(f"enrolled site {site!r} in federation {cfg.federation.name!r}; give the site:")
        for key, value in sheet.items():
            print(f"  {key:<28} {value}")
        print(_reload_hint(cfg))
    return 0


def _write_bundle(out: Path, cfg: CoordinatorConfig, password: str) -> None:
    """The coordinator's two public key files, the site's broker password (0600), the broker's CA if TLS."""
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in (k.SIGNING_PUB_FILE, k.BOX_PUB_FILE):
        write_text(out / name, (cfg.keys_dir / name).read_text(), mode=0o644)
    if cfg.broker.ca_file is not None:  # mqtts://: the CA the site checks the broker's certificate against
        write_text(out / BUNDLE_CA, Path(cfg.broker.ca_file).read_text(), mode=0o644)
    write_text(out / "mqtt-password", password + "\n", mode=0o600)


def _revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    site = check_id(args.site, what="site")
    revoked = k.read_registry(cfg.registry_path).revoke(site)
    k.write_registry(cfg.registry_path, revoked)  # first: its updates are refused from here on
    passwd = cfg.mosquitto_settings().password_path
    if any(line.split(":", 1)[0] == site for line in passwd.read_text().splitlines()):
        mosquitto.remove_user(passwd, site)
    _rewrite_acl(cfg, revoked)
    print(f"revoked site {site!r} of federation {cfg.federation.name!r}")
    print(_reload_hint(cfg))
    return 0


def _broker_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    check_config(url=cfg.broker.url, port=cfg.mosquitto.port, tls_names=cfg.mosquitto.tls_names)
    registry = k.read_registry(cfg.registry_path)
    blocked = deploy.write_broker_files(cfg, registry=registry, coordinator_password=_read_secret(cfg),
                                        observer_passwords=_observer_passwords(cfg),
                                        renew_certificate=args.new_server_certificate)
    settings = cfg.mosquitto_settings(sites=len(registry.sites))
    print(f"wrote the broker files of federation {cfg.federation.name!r} in {cfg.mosquitto_dir}")
    print(f"  {settings.conf_path}: listener {settings.port} {settings.address}"
          f"{' (TLS)' if settings.tls else ''}, max_queued_messages {settings.max_queued_messages}, "
          f"max_inflight_messages {settings.max_inflight_messages} for {len(registry.sites)} site(s)")
    missing = sorted(set(registry.sites) - set(deploy.password_users(settings.password_path)))
    if missing:
        print(f"  sites without a broker account: {', '.join(missing)} (give each one: enroll --replace)")
    if blocked:
        _warn_blocked(blocked)
        return 2
    print("  restart mosquitto to apply listener changes: systemctl restart mosquitto")
    return 0


def _reload_hint(cfg: CoordinatorConfig) -> str:
    return (f"  reload mosquitto so it reads {cfg.mosquitto_dir}/passwd and acl again: "
            "kill -HUP $(pidof mosquitto)  (or: systemctl reload mosquitto)")


# ------------------------------------------------------------------------------------------- run


class RegistryWatcher:
    """Reads the registry file again when its identity, size or modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def changed(self) -> k.Registry | None:
        signature = self._signature()
        if signature == self._seen:
            return None
        self._seen = signature
        try:
            return k.read_registry(self.path)
        except k.RegistryError as e:
            logging.getLogger("fednca.coordinator").error("registry not reloaded, the sites stay as they were: %s", e)
            return None


def kill_hook(spec: str | None) -> Callable[[str], None] | None:
    """The test-only SIGKILL hook of ``FEDNCA_COORDINATOR_KILL_AFTER=ACTION[:N]``."""
    if not spec:
        return None
    name, _, count = spec.partition(":")
    target, seen = int(count or 1), [0]

    def hook(action: str) -> None:
        if action == name:
            seen[0] += 1
            if seen[0] == target:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


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
                      password=_read_secret(cfg), tls=tls, keepalive=b.keepalive,
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
                      password=_read_secret(cfg, path, key=f"observer {user}"), tls=tls, keepalive=b.keepalive,
                      max_packet_size=b.max_packet_size, protocol=b.protocol, clean_start=True, **options)


def _run(args: argparse.Namespace) -> int:
    from .coordinator import Coordinator

    cfg = load_config(args.folder / CONFIG_NAME)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client = broker_client(cfg)
    coordinator_store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    coordinator = Coordinator(
        config=cfg.federation, store=coordinator_store,
        keys=k.read_coordinator_keys(cfg.keys_dir), registry=k.read_registry(cfg.registry_path), client=client,
        clock=time.time, after_action=kill_hook(os.environ.get(KILL_ENV)),
    )  # fmt: skip
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: coordinator.stop())
    watcher = RegistryWatcher(cfg.registry_path)
    notifier = Notifier()
    with coordinator_store.lock():  # one coordinator per store; rollback waits for it to stop
        try:
            coordinator.start()
            notifier.ready(f"federation {cfg.federation.name}: running")
            pinged = time.monotonic()
            while not coordinator.finished and not coordinator.stopped:
                coordinator.step(args.poll)
                registry = watcher.changed()
                if registry is not None:
                    coordinator.set_registry(registry)
                if notifier.watchdog_interval is not None and time.monotonic() - pinged >= notifier.watchdog_interval:
                    notifier.watchdog()  # from the loop itself: a hung step stops the pings
                    pinged = time.monotonic()
        finally:
            notifier.stopping()
            if not coordinator.wait_published(10.0):
                logging.getLogger("fednca.coordinator").warning("the broker did not take every message within 10 s")
            client.disconnect()
            notifier.close()
    return 0


# ------------------------------------------------------------------------------------------ rollback


def _rollback(args: argparse.Namespace) -> int:
    from .rollback import roll_back

    cfg = load_config(args.folder / CONFIG_NAME)
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    with store.lock():
        done = roll_back(store=store, to_round=args.to_round, enrolled=frozenset(k.read_registry(cfg.registry_path).sites),
                         config=cfg.federation.rounds, now=time.time())  # fmt: skip
    abandoned = f"; {done.abandoned} accepted update(s) of the open round abandoned" if done.abandoned else ""
    print(f"round {done.round} will train from the model of round {done.to_round} "
          f"(model {done.model_sha256[:12]}){abandoned}; start the coordinator to announce it")
    return 0


# ------------------------------------------------------------------------------------------ check


def _check(args: argparse.Namespace) -> int:
    from .preflight import main as check_main

    return check_main(args.folder, as_json=args.json)


# ------------------------------------------------------------------------------------------ show


def _show(args: argparse.Namespace) -> int:
    from fednca.display import local_time, relative, safe

    from .round_history import history, render_rounds

    cfg = load_config(args.folder / CONFIG_NAME)
    registry = k.read_registry(cfg.registry_path)
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    state = store.load_state()
    h = history(store.read_log(), enrolled=registry.sites)
    f, now = cfg.federation, time.time()
    info: dict[str, Any] = {
        "federation": f.name, "broker": cfg.broker.url, "sites": sorted(registry.sites),
        "round": None if state is None else {
            "round": state.round, "status": str(state.status), "deadline": float(state.deadline),
            "quorum": state.quorum, "accepted": [a.site for a in state.accepted],
            "close_reason": None if state.close_reason is None else str(state.close_reason),
        },
        "max_rounds": f.max_rounds, "aggregation": f.aggregation.method, "model": f.model.preset,
        "finished": h.finished, "finished_at": h.finished_at, "revoked": list(h.revoked),
        "errors": {s: e.to_dict() for s, e in sorted(h.errors.items())},
        "rounds": [r.to_dict() for r in h.latest(args.rounds)],
    }  # fmt: skip
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    print(f"federation {f.name!r} at {cfg.folder} (broker {cfg.broker.url})")
    print(f"  sites ({len(registry.sites)}): {', '.join(sorted(registry.sites)) or 'none enrolled'}"
          + (f"; revoked: {', '.join(h.revoked)}" if h.revoked else ""))
    if state is None:
        print("  no round opened yet")
    elif h.finished:
        print(f"  finished after {h.finished_round} rounds, {local_time(h.finished_at)} "
              f"({relative(h.finished_at, now)}); the final model is announced as round {h.finished_round + 1}")
    else:
        when = f"deadline {local_time(state.deadline)} ({relative(state.deadline, now)})"
        print(f"  round {state.round} of {f.max_rounds or 'unlimited'}: {state.status}"
              + (f" ({state.close_reason})" if state.close_reason else f", {when}")
              + f"; {len(state.accepted)} of {state.quorum} needed accepted")
    for line in render_rounds(h, count=args.rounds, now=now):
        print(f"  {line}")
    for site, e in sorted(h.errors.items()):
        print(f"  error: site {safe(site, 40)}: update of round {e.round} rejected ({safe(e.reason, 40)}), "
              f"{relative(e.at, now)}")
    return 0
