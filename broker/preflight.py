"""``fednca coordinator check DIR``: everything that would stop the coordinator or its broker.

``run`` stops at the first missing file; this check lists every problem at once, each with the
key or file and the fix (exit status 2 when any would stop the service, else 0):

* ``coordinator.yaml`` valid, and ``broker.url`` agreeing with the ``mosquitto`` section
  (:func:`.listener.check_config`: scheme and TLS names, port);
* the coordinator's keys: private ones present, 0600 and matching their public halves;
  the broker password file 0600 and non-empty; the site registry readable;
* the broker files (conf, passwd, acl, and for TLS the CA, certificate and key) present, readable
  by the account mosquitto runs as in folders it may enter, its persistence folder writable by
  it, and their contents what ``broker-config`` would write now (listener, limits, ACL, the
  enrolled sites' accounts, the certificate's names);
* the round store writable; for ``mqtts://`` the CA the coordinator trusts.

Access is judged for mosquitto's account from owners and mode bits (:func:`permits`, pure), as
:func:`.mosquitto.secure` sets them, since the check runs as root or the coordinator's user.
"""

from __future__ import annotations

import grp
import json
import stat
import sys
from pathlib import Path
from typing import Literal

from fednca import keys as k
from fednca.checks import Finding, Report, open_problem, private_mode_problem, writable_folder_problem
from fednca.errors import ConfigError

from . import deploy, mosquitto, tls
from .config import CONFIG_NAME, ConfigFileError, CoordinatorConfig, load_config
from .listener import check_config
from .mosquitto import BrokerAccount

Access = Literal["r", "w", "x"]
_BITS = {"r": (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH), "w": (stat.S_IWUSR, stat.S_IWGRP, stat.S_IWOTH),
         "x": (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)}


def permits(*, mode: int, owner: int, group: int, uid: int, groups: frozenset[int], want: Access) -> bool:
    """Whether a user (``uid`` in ``groups``) may ``want`` a file of this owner, group and mode (root may all)."""
    if uid == 0:
        return True
    user_bit, group_bit, other_bit = _BITS[want]
    if owner == uid:
        return bool(mode & user_bit)
    if group in groups:
        return bool(mode & group_bit)
    return bool(mode & other_bit)


def _groups(account: BrokerAccount) -> frozenset[int]:
    return frozenset({account.gid} | {g.gr_gid for g in grp.getgrall() if account.user in g.gr_mem})


def _may(path: Path, account: BrokerAccount, want: Access) -> bool:
    st = path.stat()
    return permits(mode=st.st_mode, owner=st.st_uid, group=st.st_gid, uid=account.uid, groups=_groups(account),
                   want=want)


def check(folder: Path) -> Report:
    path = folder / CONFIG_NAME
    try:
        cfg = load_config(path)
    except ConfigFileError as e:
        return Report(source=str(path), findings=tuple(
            Finding(key, why, f"correct {path}" if key == "(file)" else
                    f"correct the key in {path} (docs/coordinator.md lists every key)") for key, why in e.problems))
    findings: list[Finding] = []
    try:
        check_config(url=cfg.broker.url, port=cfg.mosquitto.port, tls_names=cfg.mosquitto.tls_names)
    except ConfigError as e:
        findings.append(Finding(e.field, e.why, f"make broker.url and the mosquitto section agree in {path}, "
                                f"then: fednca coordinator broker-config {folder}"))
    findings += key_findings(cfg) + password_findings(cfg)
    registry: k.Registry | None = None
    try:
        registry = k.read_registry(cfg.registry_path)
    except k.RegistryError as e:
        findings.append(Finding("registry", str(e).partition(": ")[2] or str(e),
                                "restore registry.json from a backup (enrolment writes it; the coordinator reads it)",
                                path=str(cfg.registry_path)))
    findings += broker_findings(cfg, registry)
    why = writable_folder_problem(cfg.store_root)
    if why is not None:
        findings.append(Finding("store", why, f"let the coordinator's user write it: chown -R USER: {cfg.store_root}",
                                path=str(cfg.store_root)))
    notes = [f"federation {cfg.federation.name!r}: {0 if registry is None else len(registry.sites)} site(s) enrolled, "
             f"broker {cfg.broker.url}"]
    return Report(source=str(path), findings=tuple(findings), notes=tuple(notes))


def key_findings(cfg: CoordinatorConfig) -> list[Finding]:
    out: list[Finding] = []
    names = [k.SIGNING_KEY_FILE, k.BOX_KEY_FILE] + (["broker-ca.key"] if cfg.mosquitto.tls_names else [])
    for name in names:
        p = cfg.keys_dir / name
        why = open_problem(p)
        if why is not None:
            fix = (f"restore it from the coordinator's backup (a new key means enrolling every site again)"
                   if why == "no such file" else "run the check as the coordinator's user, who must read it")
            out.append(Finding("keys", why, fix, path=str(p)))
        elif private_mode_problem(p):
            out.append(Finding("keys", f"private key {private_mode_problem(p)}", f"chmod 600 {p}", path=str(p)))
    if not out:
        try:
            k.read_coordinator_keys(cfg.keys_dir)
        except k.KeyFileError as e:
            at, _, why = str(e).partition(": ")
            out.append(Finding("keys", why, "restore the coordinator's key files from its backup", path=at))
    return out


def password_findings(cfg: CoordinatorConfig) -> list[Finding]:
    p = cfg.password_path
    why = open_problem(p) or private_mode_problem(p)
    if why is None and not p.read_text(errors="replace").strip():
        why = "empty"
    if why is None:
        return []
    fix = f"chmod 600 {p}" if why.startswith("readable by") else (
        f"write the coordinator's broker password there (0600), then: fednca coordinator broker-config {cfg.folder}")
    return [Finding("broker.password_file", why, fix, path=str(p))]


def broker_findings(cfg: CoordinatorConfig, registry: k.Registry | None) -> list[Finding]:
    """The files mosquitto reads: present, readable by its account, and what broker-config writes now."""
    again = f"write them again: fednca coordinator broker-config {cfg.folder}"
    account = mosquitto.broker_account(cfg.mosquitto.user)
    settings = deploy.settings_for(cfg, sites=0 if registry is None else len(registry.sites), account=account)
    folder = Path(settings.folder)
    files = [settings.conf_path, settings.password_path, settings.acl_path]
    if settings.tls is not None:
        files += [Path(settings.tls.cafile), Path(settings.tls.certfile), Path(settings.tls.keyfile)]
    out: list[Finding] = []
    for parent in dict.fromkeys([*reversed(folder.resolve().parents), folder.resolve()]):
        if parent.exists() and not _may(parent, account, "x"):
            out.append(Finding("mosquitto.folder", f"the {account.user!r} user cannot enter this folder, so mosquitto "
                               "cannot read the broker files below it", f"chmod o+x {parent}, or set mosquitto.folder "
                               f"in coordinator.yaml and run broker-config", path=str(parent)))
            return out
    present = []
    for p in files:
        if not p.is_file():
            out.append(Finding("mosquitto.folder", "broker file missing", again, path=str(p)))
        elif not _may(p, account, "r"):
            out.append(Finding("mosquitto.folder", f"the {account.user!r} user cannot read it",
                               f"chgrp {account.user} {p} && chmod 640 {p}, or {again}", path=str(p)))
        else:
            present.append(p)
    data = settings.data_path
    if not data.is_dir() or not (_may(data, account, "w") and _may(data, account, "x")):
        out.append(Finding("mosquitto.data_folder", f"mosquitto's persistence folder is missing or the "
                           f"{account.user!r} user cannot write it", again, path=str(data)))
    if settings.conf_path in present and settings.conf_path.read_text() != mosquitto.render_conf(settings):
        out.append(Finding("mosquitto", "mosquitto.conf differs from what coordinator.yaml asks (listener, limits, "
                           "files)", f"{again}, then restart mosquitto", path=str(settings.conf_path)))
    if registry is None:
        return out
    if settings.acl_path in present and settings.acl_path.read_text() != mosquitto.render_acl(
            settings.federation, coordinator_user=settings.coordinator_user, sites=registry.sites,
            observers=settings.observer_users, bridges=deploy.bridges(cfg, registry)):
        out.append(Finding("mosquitto", "the ACL does not match the enrolled sites", f"{again}, then reload mosquitto",
                           path=str(settings.acl_path)))
    if settings.password_path in present:
        users = set(deploy.password_users(settings.password_path))
        if settings.coordinator_user not in users:
            out.append(Finding("broker.username", "no broker account for the coordinator "
                               f"({settings.coordinator_user})", again, path=str(settings.password_path)))
        for user in settings.observer_users:  # the views cannot log in; the coordinator still runs
            if user not in users or not cfg.observer_password_path(user).is_file():
                out.append(Finding("mosquitto", f"no broker account for the read-only view {user!r} "
                                   "(fednca status, the demo's monitor)", f"{again}, then reload mosquitto",
                                   path=str(cfg.observer_password_path(user)), severity="warning"))
        for site in sorted(set(registry.sites) - users):
            out.append(Finding("registry", f"enrolled site {site!r} has no broker account",
                               f"fednca coordinator enroll {cfg.folder} {site} KEY --replace (a new password)",
                               path=str(settings.password_path)))
    if settings.tls is not None and Path(settings.tls.certfile) in present:
        names = set(tls.names_of(Path(settings.tls.certfile).read_bytes()))
        if names != set(cfg.mosquitto.tls_names):
            out.append(Finding("mosquitto.tls_names", f"the server certificate names {', '.join(sorted(names))}, "
                               f"not {', '.join(cfg.mosquitto.tls_names)}",
                               f"fednca coordinator broker-config {cfg.folder} --new-server-certificate",
                               path=settings.tls.certfile))
    if cfg.broker.url.startswith("mqtts://"):
        ca = cfg.broker.ca_file
        why = "not given" if ca is None else open_problem(Path(ca))
        if why is not None:
            out.append(Finding("broker.ca_file", f"the CA the coordinator checks the broker against: {why}",
                               f"ca_file: {cfg.broker_ca_cert} (made by init); {again}", path=ca))
    return out


def main(folder: Path, *, as_json: bool = False) -> int:
    """Print the report of ``folder``; 0 when nothing would stop the coordinator, else 2."""
    report = check(folder)
    if as_json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        lines = report.lines()
        for line in lines[:-1]:
            print(line, file=sys.stdout if line.startswith("#") else sys.stderr)
        print(lines[-1], file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 2
