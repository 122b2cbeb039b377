"""``fednca coordinator bridge``: a regional broker's files, and the central broker's side of its bridge.

    fednca coordinator bridge DIR REGION --broker mqtt://eu-hub.example:1883 --site clinic-a --site clinic-b
    fednca coordinator bridge DIR REGION --site clinic-c            (add a site to an existing region)
    fednca coordinator bridge DIR REGION --remove-site clinic-a     (it connects to the central broker again)
    fednca coordinator enroll DIR SITE KEY --region REGION          (enrol a site straight into a region)

Each run records the region in ``regions.json`` (:mod:`fednca_broker.regions`) and writes, from
that record and the site registry:

* in the region's folder (``--broker-dir``, default ``DIR/regions/REGION``; copy it to the same
  path on the regional host): ``mosquitto.conf`` (the federation's usual broker settings, sized for
  the region's sites, plus the bridge section of :func:`fednca_broker.bridge.render_bridge`),
  ``passwd`` (the region's sites, with the very password hashes the central broker holds, so a
  site keeps its password and only its broker address changes), ``acl``, and for TLS the
  certificates: the central broker's CA (``central-ca.pem``) when the bridge speaks mqtts, and
  for an ``mqtts://`` region a server certificate issued by the federation's CA, the one every
  site already trusts;
* on the central broker: the account ``bridge-REGION`` (its password in
  ``secrets/bridge-REGION-mqtt-password``) and its ACL block naming each of the region's topics.

The central broker takes the new account and ACL on a reload (SIGHUP); the regional broker must be
restarted for a changed bridge section (mosquitto does not reload bridges) but only reloaded
when its sites change.
"""

from __future__ import annotations

import argparse
import datetime as dt
import secrets
from pathlib import Path

from fednca import keys as k
from fednca.atomic import write_bytes, write_text
from fednca.errors import FedNCAError
from fednca.topics import check_id
from fednca.transport.mqtt import parse_url

from . import deploy, mosquitto, tls
from .bridge import Bridge, bridge_user, render_bridge, render_regional_acl
from .config import CONFIG_NAME, OBSERVERS, CoordinatorConfig, load_config
from .listener import plan_listener
from .mosquitto import MosquittoSettings, TLSListener, limits_for
from .regions import Region, RegionError, Regions, password_path, read_regions, write_regions

CENTRAL_CA = "central-ca.pem"  # in a region's folder: the CA the bridge checks the central broker against
SHOWN = 20  # sites named in the command's summary (regions.json lists them all)


def configure(sub: argparse._SubParsersAction) -> None:
    """The ``bridge`` action of ``fednca coordinator``."""
    p = sub.add_parser("bridge", help="set up a regional broker bridged to the central one, and its sites")
    p.add_argument("folder", type=Path, metavar="DIR", help="the federation folder")
    p.add_argument("region", help="the region's id (a-z 0-9 _ -); its bridge logs in as bridge-REGION")
    p.add_argument("--broker", help="the regional broker's address its sites connect to, mqtt:// or mqtts:// "
                   "(needed for a new region; given again, it replaces the old)")
    p.add_argument("--listen", metavar="ADDRESS:PORT", help="what the regional mosquitto binds (with --broker)")
    p.add_argument("--tls-name", action="append", default=[], metavar="NAME",
                   help="a name of the regional broker's certificate (repeat; with an mqtts:// --broker)")
    p.add_argument("--central", metavar="URL", help="the central broker's address as the region reaches it "
                   "(default: broker.url of coordinator.yaml)")
    p.add_argument("--broker-dir", type=Path, help="folder of the region's broker files, the same path on the "
                   "regional host (default: DIR/regions/REGION)")
    p.add_argument("--site", action="append", default=[], metavar="SITE", help="an enrolled site to move into the "
                   "region (repeat)")
    p.add_argument("--remove-site", action="append", default=[], metavar="SITE",
                   help="a site to take out of the region: it connects to the central broker again (repeat)")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ------------------------------------------------------------------------------------- the files


def regional_settings(cfg: CoordinatorConfig, region: Region, *, account: mosquitto.BrokerAccount) -> MosquittoSettings:
    """The federation's broker settings for ``region``'s mosquitto, its limits sized for its sites.

    The bridge is the one subscriber every site of the region publishes to, as the coordinator is
    on the central broker, so its queue follows the same rule (:func:`mosquitto.limits_for`).
    """
    queued, inflight = limits_for(len(region.sites))
    folder = Path(region.folder)
    listener = TLSListener.in_folder(folder, port=region.port, address=region.address) if region.tls_names else None
    m = cfg.mosquitto
    return MosquittoSettings(
        federation=cfg.federation.name, folder=str(folder), port=region.port, address=region.address,
        plain_listener=listener is None, tls=listener, coordinator_user=cfg.broker.username,
        max_queued_messages=m.max_queued_messages or queued, max_inflight_messages=m.max_inflight_messages or inflight,
        persistent_client_expiration=m.persistent_client_expiration, bind_client_ids=m.bind_client_ids,
        run_as_root=m.run_as_root, user=account.user if account.user != m.user and not m.run_as_root else m.user,
        max_packet_size=cfg.broker.max_packet_size,
    )  # fmt: skip


def region_bridge(cfg: CoordinatorConfig, region: Region) -> Bridge:
    """The bridge section's settings: the central address, the account's password, the CA for mqtts."""
    central = parse_url(region.central)
    host = f"[{central.host}]" if ":" in central.host else central.host
    return Bridge(federation=cfg.federation.name, region=region.name, address=f"{host}:{central.port}",
                  password=password_path(cfg.folder, region.name).read_text().strip(),
                  cafile=str(Path(region.folder) / CENTRAL_CA) if central.tls else None,
                  max_packet_size=cfg.broker.max_packet_size)  # fmt: skip


def _hashed_lines(passwd: Path, sites: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The central password file's lines of ``sites`` (already hashed), and the sites it lacks."""
    lines = {line.split(":", 1)[0]: line for line in passwd.read_text().splitlines() if ":" in line}
    return [lines[s] for s in sites if s in lines], [s for s in sites if s not in lines]


def _server_certificate(cfg: CoordinatorConfig, region: Region, now: dt.datetime) -> None:
    """The regional listener's certificate, issued by the federation's CA when missing or renamed."""
    folder = Path(region.folder)
    cert = folder / mosquitto.CERT_NAME
    if cert.exists() and (folder / mosquitto.KEY_NAME).exists() and set(tls.names_of(cert.read_bytes())) == set(
            region.tls_names):
        return
    ca = deploy.ensure_ca(cfg, now=lambda: now)
    server = tls.make_server_certificate(ca=ca, names=region.tls_names, now=now)
    mosquitto.write_tls(folder, server_key_pem=server.key_pem, server_cert_pem=server.cert_pem, ca_cert_pem=ca.cert_pem)


def write_region(cfg: CoordinatorConfig, region: Region, *, now: dt.datetime | None = None) -> list[str]:
    """Every file of ``region``'s mosquitto; returns the region's sites that have no central account
    (so no password to copy). Owners and modes as :func:`mosquitto.secure` gives the central's."""
    folder = Path(region.folder)
    folder.mkdir(parents=True, exist_ok=True)
    account = mosquitto.broker_account(cfg.mosquitto.user)
    settings = regional_settings(cfg, region, account=account)
    if region.tls_names:
        _server_certificate(cfg, region, now or _now())
    b = region_bridge(cfg, region)
    if b.cafile is not None:
        write_bytes(b.cafile, cfg.broker_ca_cert.read_bytes(), mode=0o644)
    lines, missing = _hashed_lines(cfg.mosquitto_settings().password_path, region.sites)
    write_text(settings.password_path, "".join(line + "\n" for line in lines), mode=0o640)
    write_text(settings.acl_path, render_regional_acl(cfg.federation.name, region=region.name, sites=region.sites),
               mode=0o640)  # fmt: skip
    write_text(settings.conf_path, mosquitto.render_conf(settings) + "\n" + render_bridge(b), mode=0o640)
    mosquitto.secure(settings, account)
    if b.cafile is not None:
        Path(b.cafile).chmod(0o644)
    return missing


def _ensure_account(cfg: CoordinatorConfig, region: str) -> None:
    """The bridge's account on the central broker: a password made once, set in the central passwd."""
    path = password_path(cfg.folder, region)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_text(path, secrets.token_urlsafe(24) + "\n", mode=0o600)
    mosquitto.set_password(cfg.mosquitto_settings().password_path, bridge_user(region), path.read_text().strip())


def apply(cfg: CoordinatorConfig, after: Regions, *, registry: k.Registry, touched: set[str]) -> list[str]:
    """Record ``after``, write the files of every region in ``touched`` and the central ACL; the
    sites without a central password (warnings)."""
    write_regions(cfg.folder, after)
    missing = []
    for name in sorted(touched & set(after.regions)):
        missing += write_region(cfg, after.regions[name])
    deploy.update_access(cfg, registry=registry)
    return missing


def place_site(cfg: CoordinatorConfig, site: str, *, region: str | None, registry: k.Registry) -> str | None:
    """After ``enroll`` (``--region`` or not): the site joins ``region``, and the files of the region
    holding it are written again (its password hash changed). The URL it connects to, or None."""
    before = read_regions(cfg.folder)
    after = before if region is None else before.assign(region, add=[site])
    holder = after.region_of(site)
    if holder is None:
        return None
    previous = before.region_of(site)
    apply(cfg, after, registry=registry, touched={holder, *([previous] if previous else [])})
    return after.regions[holder].url


def forget_site(cfg: CoordinatorConfig, site: str, *, registry: k.Registry) -> None:
    """After ``revoke``: the site leaves its region, whose broker no longer lets it in."""
    before = read_regions(cfg.folder)
    holder = before.region_of(site)
    if holder is not None:
        apply(cfg, before.drop_site(site), registry=registry, touched={holder})


# ----------------------------------------------------------------------------------- the command


def _region_from_args(args: argparse.Namespace, cfg: CoordinatorConfig, old: Region | None) -> Region:
    name = args.region
    if old is None and args.broker is None:
        raise FedNCAError(f"region {name!r} is new: give the address its sites connect to (--broker URL)")
    if args.broker is None and (args.listen or args.tls_name):
        raise FedNCAError("--listen and --tls-name change the regional listener: give --broker with them")
    if args.broker is not None:
        plan = plan_listener(broker=args.broker, listen=args.listen, tls_names=args.tls_name)
        url, address, port, names = plan.url, plan.address, plan.port, plan.tls_names
    else:
        assert old is not None
        url, address, port, names = old.url, old.address, old.port, old.tls_names
    central = args.central or (old.central if old is not None else cfg.broker.url)
    hub = parse_url(central)
    if hub.tls and not cfg.broker_ca_cert.is_file():
        raise FedNCAError(f"the central broker speaks mqtts but {cfg.broker_ca_cert} (its CA) is missing")
    if hub.tls and not tls.covers(tuple(cfg.mosquitto.tls_names), hub.host):
        raise FedNCAError(f"the central broker's certificate does not name {hub.host}, so the bridge would refuse "
                          f"it: add {hub.host} to mosquitto.tls_names in coordinator.yaml and run fednca coordinator "
                          f"broker-config {cfg.folder} --new-server-certificate, or give --central with a name it has")
    if args.broker_dir is not None:
        folder = str(args.broker_dir.resolve())
    else:
        folder = old.folder if old is not None else str((cfg.folder / "regions" / name).resolve())
    return Region(name=name, url=url, address=address, port=port, central=str(parse_url(central)), folder=folder,
                  tls_names=names, sites=old.sites if old is not None else ())  # fmt: skip


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.folder / CONFIG_NAME)
    name = check_id(args.region, what="region")
    registry = k.read_registry(cfg.registry_path)
    user = bridge_user(name)
    if user in registry.sites or user == cfg.broker.username or user in OBSERVERS:
        raise FedNCAError(f"region {name!r}: its bridge account {user!r} is already a broker user of this federation")
    unknown = sorted(set(args.site) - set(registry.sites))
    if unknown:
        raise FedNCAError(f"not enrolled: {', '.join(unknown)} (fednca coordinator enroll first)")
    before = read_regions(cfg.folder)
    old = before.regions.get(name)
    region = _region_from_args(args, cfg, old)
    left = {r for r in map(before.region_of, args.site) if r is not None and r != name}
    try:
        after = before.put(region).assign(name, add=args.site, remove=args.remove_site)
    except RegionError as e:
        raise FedNCAError(str(e)) from None
    _ensure_account(cfg, name)
    missing = apply(cfg, after, registry=registry, touched={name, *left})
    deploy.hand_over(cfg)
    done = after.regions[name]
    print(f"region {name!r} of federation {cfg.federation.name!r}: {len(done.sites)} site(s), "
          f"bridged to {done.central}")
    print(f"  regional broker files in {done.folder}: copy that folder to the same path on the regional host "
          f"(keeping owners and modes, e.g. rsync -a) and run  mosquitto -c {Path(done.folder) / mosquitto.CONF_NAME}")
    print(f"  central broker: account {user} added with its ACL; reload it: kill -HUP $(pidof mosquitto)")
    if old is not None:
        print("  the regional mosquitto reads its bridge section only at start: restart it if the bridge changed, "
              "else reload it")
    if done.sites:
        more = len(done.sites) - SHOWN
        shown = ", ".join(done.sites[:SHOWN]) + (f" and {more} more" if more > 0 else "")
        print(f"  these sites now set broker.url: {done.url} in their daemon.yaml (password and keys unchanged): "
              f"{shown}")
    for site in args.remove_site:
        print(f"  {site}: back on the central broker, broker.url: {cfg.broker.url}")
    for site in missing:
        print(f"  warning: site {site!r} has no account on the central broker, so none in the region: "
              f"fednca coordinator enroll {cfg.folder} {site} KEY --replace")
    return 0
