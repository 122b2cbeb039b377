"""Setting a federation up: ``fednca coordinator init``, ``enroll``, ``revoke`` and ``broker-config``.

These commands write the federation folder (keys, coordinator.yaml, the site registry, the initial
model) and every file mosquitto reads (password file, ACL, conf, certificates), owned and moded so
that the ``mosquitto`` user reads them; ``broker/cli.py`` parses the arguments and calls them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import yaml

from fednca import keys as k
from fednca.atomic import write_text
from fednca.config import preset, train_preset
from fednca.errors import ConfigError, FedNCAError
from fednca.topics import check_id

from . import bridge_setup, deploy, mosquitto
from .clients import read_secret
from .config import (CONFIG_NAME, OBSERVERS, BrokerConfig, CoordinatorConfig, FederationConfig, MosquittoConfig,
                     load_config, to_yaml_dict)
from .listener import check_config, plan_listener
from .regions import read_regions
from .rounds import RoundConfig
from .store import RoundStore

BUNDLE_CA = "ca.crt"  # the name the daemon's configuration expects (/etc/fednca/ca.crt)


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


def init(args: argparse.Namespace) -> int:
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


def _observer_passwords(cfg: CoordinatorConfig) -> dict[str, str]:
    """Each observer account's password, made (0600, beside the coordinator's) where missing:
    ``init`` makes them, ``broker-config`` adds them to a federation made before they existed."""
    passwords = {}
    for user in OBSERVERS:
        path = cfg.observer_password_path(user)
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24))
        passwords[user] = read_secret(cfg, path, key=f"observer {user}")
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


def enroll(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    site = check_id(args.site, what="site")
    if site == cfg.broker.username or site in OBSERVERS:
        raise FedNCAError(f"site {site!r}: that is the broker user name of the coordinator or of its views")
    if site in read_regions(cfg.folder).users:
        raise FedNCAError(f"site {site!r}: that is the broker user name of a regional bridge")
    registry = k.read_registry(cfg.registry_path)
    if site in registry.sites and not args.replace:
        raise FedNCAError(f"site {site!r} is already enrolled; pass --replace to give it a new key and password")
    enrolled = registry.enrol(site, k.verify_key_from_text(args.key))
    password = secrets.token_urlsafe(24)
    mosquitto.set_password(cfg.mosquitto_settings().password_path, site, password)
    url = bridge_setup.place_site(cfg, site, region=args.region, registry=enrolled) or cfg.broker.url
    _rewrite_acl(cfg, enrolled)
    k.write_registry(cfg.registry_path, enrolled)  # last: the site counts from here on
    deploy.hand_over(cfg)
    pub = k.read_coordinator_public(cfg.keys_dir)
    sheet = {
        "federation": cfg.federation.name, "site": site, "site_key_id": k.key_id(enrolled.sites[site]),
        "broker": url, "mqtt_username": site, "mqtt_password": password,
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


def revoke(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    site = check_id(args.site, what="site")
    revoked = k.read_registry(cfg.registry_path).revoke(site)
    k.write_registry(cfg.registry_path, revoked)  # first: its updates are refused from here on
    passwd = cfg.mosquitto_settings().password_path
    if any(line.split(":", 1)[0] == site for line in passwd.read_text().splitlines()):
        mosquitto.remove_user(passwd, site)
    bridge_setup.forget_site(cfg, site, registry=revoked)
    _rewrite_acl(cfg, revoked)
    print(f"revoked site {site!r} of federation {cfg.federation.name!r}")
    print(_reload_hint(cfg))
    return 0


def broker_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    check_config(url=cfg.broker.url, port=cfg.mosquitto.port, tls_names=cfg.mosquitto.tls_names)
    registry = k.read_registry(cfg.registry_path)
    blocked = deploy.write_broker_files(cfg, registry=registry, coordinator_password=read_secret(cfg),
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
