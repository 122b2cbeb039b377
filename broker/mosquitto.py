"""mosquitto's configuration for one federation: mosquitto.conf, the password file and the ACL file.

The texts are rendered by pure functions; only :func:`write_files` and the password helpers touch
the disk, and passwords are hashed by mosquitto's own ``mosquitto_passwd`` (read from a file or
stdin, never from the command line).

The ACL file has one ``user`` block per account: the coordinator's, the observers', then one per
enrolled site, whose user name is its site id, then one per regional bridge (``broker/bridge.py``).
The rules come from :func:`fednca.topics.rules`, the table the in-memory broker enforces, so both
brokers apply one policy. Enrolling or revoking a site means
writing the password and ACL files again and sending mosquitto SIGHUP (it reloads both).

Who may read them: started as root (as Debian's mosquitto.service does), mosquitto drops to its
own ``mosquitto`` user *before* it reads the password and ACL files, so every file it reads is
owned root:mosquitto 0640 (the server key too), in folders it can traverse, and its persistence
folder belongs to it. :func:`secure` applies that after every write (enrol and revoke included:
``mosquitto_passwd`` and atomic replacement would otherwise leave root:root files behind) and
names the first folder above that would keep mosquitto out. Where no ``mosquitto`` user exists,
or we are not root, the files belong to the current user and the conf tells mosquitto to stay
that user; a log line says so.

Listener limits grow with the federation (:func:`limits_for`): the coordinator is the one
subscriber every site publishes to, and a queue that overflows drops QoS 1 messages mosquitto has
already acknowledged to their senders, so its queue is sized per enrolled site.

Sessions (``bind_client_ids``, on by default): mosquitto lets any authenticated user connect with
any client id, which takes over the session of whoever held it. With ``use_username_as_clientid``
on every listener, each client's id becomes its user name: a site can take over only its own
session. The price is one session per user, so the operator's read-only views do not share the
coordinator's account: each has an observer account of its own (``observer_users``, role
``observer`` in :func:`fednca.topics.rules`: it reads what the views show and writes nothing), and a second
client of one observer account takes over only that observer's session (docs/transport.md).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fednca import topics
from fednca.atomic import fsync_dir, write_bytes, write_text
from fednca.errors import ConfigError, FedNCAError

from . import bridge
from . import workers as workers_module

DEFAULT_MAX_PACKET_SIZE = 1_048_576
CONF_NAME, PASSWORD_NAME, ACL_NAME, DATA_NAME = "mosquitto.conf", "passwd", "acl", "data"
CA_NAME, CERT_NAME, KEY_NAME = "ca.pem", "server.pem", "server.key"
BROKER_USER = "mosquitto"  # the account Debian's (and upstream's) mosquitto drops to
QUEUED_PER_SITE = 100  # messages the coordinator's queue holds per site (rule in limits_for)
MIN_QUEUED, MIN_INFLIGHT, MAX_INFLIGHT = 1000, 20, 1000
log = logging.getLogger("fednca.broker")


class MosquittoError(FedNCAError):
    """A broker file could not be made (missing tool, refused password...)."""


@dataclass(frozen=True)
class TLSListener:
    """An MQTT-over-TLS listener (``mqtts://``); clients must still log in with a password."""

    cafile: str
    certfile: str
    keyfile: str
    port: int = 8883
    address: str = "0.0.0.0"
    require_certificate: bool = False  # also demand a client certificate signed by cafile

    def __post_init__(self) -> None:
        _check_port("tls.port", self.port)
        for name in ("cafile", "certfile", "keyfile", "address"):
            _check_word(f"tls.{name}", getattr(self, name))

    @classmethod
    def in_folder(cls, folder: str | os.PathLike, *, port: int, address: str) -> "TLSListener":
        """A listener on the CA, certificate and key that :func:`write_tls` puts in ``folder``."""
        f = Path(folder)
        return cls(cafile=str(f / CA_NAME), certfile=str(f / CERT_NAME), keyfile=str(f / KEY_NAME),
                   port=port, address=address)  # fmt: skip


@dataclass(frozen=True)
class MosquittoSettings:
    federation: str
    folder: str  # where mosquitto.conf, passwd, acl and the persistence data go
    port: int = 1883
    address: str = "127.0.0.1"  # plain listener; loopback unless the network is trusted
    plain_listener: bool = True  # False: serve TLS only
    tls: TLSListener | None = None
    coordinator_user: str = "coordinator"
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    persistent_client_expiration: str = "7d"  # a site offline longer loses its queued messages
    max_queued_messages: int = MIN_QUEUED
    max_inflight_messages: int = MIN_INFLIGHT
    autosave_interval: int = 60  # seconds between saves of the persistence file
    run_as_root: bool = False  # add `user root` (containers without a mosquitto account)
    user: str = BROKER_USER  # the account mosquitto drops to when started as root
    data_folder: str | None = None  # persistence; None: <folder>/data
    # Each client's id is its user name: no user can take over another's session. The federation's
    # configuration (coordinator.yaml, fednca_broker.config) turns it on unless told otherwise; a
    # broker made by hand from these settings gets it only when asked.
    bind_client_ids: bool = False
    observer_users: tuple[str, ...] = ()  # read-only accounts of the operator's views
    workers: int = 0  # accounts <coordinator_user>-w1 .. -wN of the coordinator's workers (workers.py)


    def __post_init__(self) -> None:
        topics.check_id(self.federation, what="federation")
        topics.check_id(self.coordinator_user, what="coordinator_user")
        for user in self.observer_users:
            topics.check_id(user, what="observer_users")
            if user == self.coordinator_user:
                raise ConfigError("observer_users", f"{user!r} is the coordinator's user name")
        _check_word("folder", self.folder)
        _check_word("address", self.address)
        _check_word("persistent_client_expiration", self.persistent_client_expiration)
        _check_word("user", self.user)
        if self.data_folder is not None:
            _check_word("data_folder", self.data_folder)
        _check_port("port", self.port)
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or not 0 <= self.workers <= 64:
            raise ConfigError("workers", f"must be a whole number from 0 to 64, got {self.workers!r}")
        if not self.plain_listener and self.tls is None:
            raise ConfigError("plain_listener", "false needs a tls listener, or nothing listens")
        for name in ("max_packet_size", "max_queued_messages", "max_inflight_messages", "autosave_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(name, "must be a positive integer")

    @property
    def conf_path(self) -> Path:
        return Path(self.folder) / CONF_NAME

    @property
    def password_path(self) -> Path:
        return Path(self.folder) / PASSWORD_NAME

    @property
    def acl_path(self) -> Path:
        return Path(self.folder) / ACL_NAME

    @property
    def data_path(self) -> Path:
        return Path(self.data_folder) if self.data_folder else Path(self.folder) / DATA_NAME


def limits_for(sites: int) -> tuple[int, int]:
    """(max_queued_messages, max_inflight_messages) for a federation of ``sites`` enrolled sites.

    Rule: the coordinator's queue holds ``QUEUED_PER_SITE`` (100) messages per site plus its own
    share, never fewer than mosquitto's default 1000: at the default 60 s telemetry interval that
    rides out more than an hour and a half of coordinator downtime before a site's message could
    be dropped. In flight (sent, not yet acknowledged) it may hold one message per site, between
    20 (mosquitto's default) and 1000, so one round's updates reach it in one window and are
    stored in one group commit.
    """
    if not isinstance(sites, int) or sites < 0:
        raise ConfigError("sites", f"must be a count >= 0, got {sites!r}")
    return max(MIN_QUEUED, QUEUED_PER_SITE * (sites + 1)), min(MAX_INFLIGHT, max(MIN_INFLIGHT, sites))


def _check_port(field: str, port: object) -> None:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(field, f"{port!r} is not a TCP port")


def _check_word(field: str, value: object) -> None:
    # mosquitto.conf has no quoting: a value with blanks or a line break would be misread.
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ConfigError(field, f"{value!r} must be a non-empty value without blanks")


def render_conf(settings: MosquittoSettings) -> str:
    s = settings
    lines = [
        f"# mosquitto configuration for FedNCA federation {s.federation!r}. Generated by fednca:",
        "# write it again rather than editing it.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {s.password_path}",
        f"acl_file {s.acl_path}",
        "persistence true",
        f"persistence_location {s.data_path}/",
        f"autosave_interval {s.autosave_interval}",
        f"max_packet_size {s.max_packet_size}",
        f"persistent_client_expiration {s.persistent_client_expiration}",
        f"max_queued_messages {s.max_queued_messages}",
        "max_queued_bytes 0",  # no byte cap: it would make large junk push honest messages out sooner
        f"max_inflight_messages {s.max_inflight_messages}",
        f"user {'root' if s.run_as_root else s.user}",
    ]
    bound = ["use_username_as_clientid true"] if s.bind_client_ids else []  # a listener's own setting
    if s.plain_listener:
        lines += ["", f"listener {s.port} {s.address}", *bound]
    if s.tls is not None:
        t = s.tls
        lines += [
            "",
            f"listener {t.port} {t.address}",
            *bound,
            f"cafile {t.cafile}",
            f"certfile {t.certfile}",
            f"keyfile {t.keyfile}",
            f"require_certificate {'true' if t.require_certificate else 'false'}",
            "tls_version tlsv1.2",  # the minimum: TLS 1.0 and 1.1 are refused
        ]
    return "\n".join(lines) + "\n"


def render_acl(federation: str, *, coordinator_user: str, sites: Iterable[str],
               observers: Iterable[str] = (), bridges: Mapping[str, Iterable[str]] | None = None,
               workers: Iterable[str] = ()) -> str:
    """The ACL file: the coordinator's block, the observers', one block per site (sorted), then one
    per regional bridge (``bridges``: region -> its sites; rules in :func:`bridge.bridge_rules`),
    then one per coordinator worker (``workers``: their users; rules in :mod:`.workers`)."""
    site_ids = sorted(set(sites))
    observer_ids = list(dict.fromkeys(observers))
    worker_ids = list(dict.fromkeys(workers))
    regions = dict(sorted((bridges or {}).items()))
    for taken in (coordinator_user, *observer_ids, *map(bridge.bridge_user, regions), *worker_ids):
        if taken in site_ids:
            raise ConfigError("sites", f"no site may be named {taken!r}, a broker account of the coordinator's")
    lines = [
        f"# mosquitto ACL for FedNCA federation {federation!r}. Generated by fednca from the",
        "# federation's rule table: write it again rather than editing it. A site's user name is",
        "# its site id; whatever no line grants is denied.",
    ]
    accounts = [(coordinator_user, topics.COORDINATOR), *((o, topics.OBSERVER) for o in observer_ids),
                *((s, topics.SITE) for s in site_ids)]
    for user, role in accounts:
        lines += ["", f"user {user}"]
        for rule in topics.rules(role=role, user=user, federation=federation):
            lines.append(f"topic {rule.access} {rule.topic_filter}")
        if role == topics.COORDINATOR and worker_ids:
            lines += [f"topic {r.access} {r.topic_filter}" for r in workers_module.aggregator_rules(federation)]
    for worker in worker_ids:
        lines += ["", f"user {worker}"]
        lines += [f"topic {r.access} {r.topic_filter}" for r in workers_module.worker_rules(federation)]
    for region, members in regions.items():
        lines += ["", f"user {bridge.bridge_user(region)}"]
        lines += [f"topic {r.access} {r.topic_filter}"
                  for r in bridge.bridge_rules(federation, region=region, sites=members)]
    return "\n".join(lines) + "\n"


def _mosquitto_passwd() -> str:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise MosquittoError(
            "mosquitto_passwd not found: install mosquitto (apt-get install mosquitto) to make "
            "the broker's password file"
        )
    return tool


def _check_password(user: str, password: str) -> None:
    if not isinstance(password, str) or not password or "\n" in password or "\r" in password:
        raise ConfigError(f"password of {user}", "must be a non-empty single line")


def write_password_file(
    path: str | os.PathLike, users: Mapping[str, str], *, mode: int = 0o640
) -> None:
    """Write a mosquitto password file for ``users`` (name -> password), replacing it atomically.

    The plain text goes to a private temporary file beside the target, ``mosquitto_passwd -U``
    hashes it in place, and only then does it replace the old file.
    """
    tool = _mosquitto_passwd()
    for user, password in users.items():
        if ":" in user or not user:
            raise ConfigError("users", f"user name {user!r} is not usable")
        _check_password(user, password)
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{u}:{p}\n" for u, p in users.items()))
        _run([tool, "-U", tmp], what=f"hashing {target}")
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def set_password(path: str | os.PathLike, user: str, password: str) -> None:
    """Add a user to an existing password file, or change its password (read from stdin)."""
    _check_password(user, password)
    _run([_mosquitto_passwd(), str(path), user], what=f"setting {user}'s password in {path}",
         stdin=f"{password}\n{password}\n")


def remove_user(path: str | os.PathLike, user: str) -> None:
    _run([_mosquitto_passwd(), "-D", str(path), user], what=f"removing {user} from {path}")


def _run(argv: list[str], *, what: str, stdin: str | None = None) -> None:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=30, check=False
    )
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {done.returncode}"
        raise MosquittoError(f"{what} failed: {why}")


@dataclass(frozen=True)
class BrokerAccount:
    """Who owns the broker files: ``owner`` (root, or us) and the group mosquitto reads them by."""

    user: str  # the account mosquitto runs as (the conf's `user` line)
    uid: int
    gid: int
    owner: int  # uid the files belong to

    @classmethod
    def current(cls) -> "BrokerAccount":
        uid, gid = os.geteuid(), os.getegid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(user=name, uid=uid, gid=gid, owner=uid)


def broker_account(user: str = BROKER_USER) -> BrokerAccount:
    """The ``mosquitto`` account when it exists and we may give files to it, else the current user."""
    me = BrokerAccount.current()
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        log.warning("no %r user on this machine: the broker files belong to %s, and mosquitto must run "
                    "as %s (install the mosquitto package for the usual set-up)", user, me.user, me.user)
        return me
    if me.uid != 0 and entry.pw_uid != me.uid:
        log.warning("not root: the broker files belong to %s only; run this as root so that the %r user "
                    "can read them", me.user, user)
        return me
    return BrokerAccount(user=user, uid=entry.pw_uid, gid=entry.pw_gid, owner=me.uid)


def _place(path: Path, account: BrokerAccount, mode: int, *, uid: int | None = None) -> None:
    if os.geteuid() == 0:
        os.chown(path, account.owner if uid is None else uid, account.gid)
    os.chmod(path, mode)


def can_traverse(folder: Path, account: BrokerAccount) -> bool:
    st = folder.stat()
    if account.uid == 0:
        return True
    if st.st_uid == account.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    groups = {account.gid} | {g.gr_gid for g in grp.getgrall() if account.user in g.gr_mem}
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def secure(settings: MosquittoSettings, account: BrokerAccount) -> list[Path]:
    """Give every broker file the owner, group and mode mosquitto needs (and no one else gets).

    Folder root:mosquitto 0750; conf, passwd, acl, server key root:mosquitto 0640; certificates
    0644; persistence folder mosquitto:mosquitto 0700. Returns the folders above that the broker's
    user cannot enter (each also logged, with the fix): empty when mosquitto can read everything.
    """
    folder = Path(settings.folder)
    _place(folder, account, 0o750)
    for name in (CONF_NAME, PASSWORD_NAME, ACL_NAME, KEY_NAME):
        if (folder / name).exists():
            _place(folder / name, account, 0o640)
    for name in (CA_NAME, CERT_NAME):
        if (folder / name).exists():
            _place(folder / name, account, 0o644)
    data = settings.data_path
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    _place(data, account, 0o700, uid=account.uid)
    blocked = []
    for parent in dict.fromkeys([*reversed(folder.resolve().parents), *reversed(data.resolve().parents)]):
        if not can_traverse(parent, account):
            log.error("%s: the %r user cannot enter this folder, so mosquitto cannot read its files below it; "
                      "allow it (chmod o+x %s) or choose another folder (mosquitto.folder in coordinator.yaml)",
                      parent, account.user, parent)
            blocked.append(parent)
    return blocked


def write_tls(folder: str | os.PathLike, *, server_key_pem: bytes, server_cert_pem: bytes, ca_cert_pem: bytes) -> None:
    """The listener's CA, certificate and key (owners and modes: :func:`secure`)."""
    f = Path(folder)
    f.mkdir(parents=True, exist_ok=True)
    write_bytes(f / KEY_NAME, server_key_pem, mode=0o600)  # private until secure() shares it with mosquitto
    write_bytes(f / CERT_NAME, server_cert_pem, mode=0o644)
    write_bytes(f / CA_NAME, ca_cert_pem, mode=0o644)


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    password_file: Path
    acl_file: Path


def write_files(
    settings: MosquittoSettings,
    *,
    coordinator_password: str,
    site_passwords: Mapping[str, str],
    observer_passwords: Mapping[str, str] | None = None,
    account: BrokerAccount | None = None,
    worker_passwords: Mapping[str, str] | None = None,
) -> BrokerFiles:
    """Write the three files (and make the persistence folder) for one federation.

    ``observer_passwords`` gives each of ``settings.observer_users`` its password; one left out
    has no broker account.

    Without ``account`` the files stay the current user's (tests, a broker run by hand).
    """
    folder = Path(settings.folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings.data_path.mkdir(mode=0o750, parents=True, exist_ok=True)
    for site in site_passwords:
        topics.check_id(site, what="site")
    observers = dict(observer_passwords or {})
    unknown = sorted(set(observers) - set(settings.observer_users))
    if unknown:
        raise ConfigError("observer_passwords", f"{unknown} are not among the observer users {settings.observer_users}")
    users = {settings.coordinator_user: coordinator_password, **observers, **(worker_passwords or {}),
             **site_passwords}
    write_password_file(settings.password_path, users)
    write_acl_and_conf(settings, sites=site_passwords, account=account)
    return BrokerFiles(settings.conf_path, settings.password_path, settings.acl_path)


def write_acl_and_conf(settings: MosquittoSettings, *, sites: Iterable[str], account: BrokerAccount | None,
                       bridges: Mapping[str, Iterable[str]] | None = None) -> None:
    """Write the ACL and mosquitto.conf again (enrolment, revocation, a new configuration, a region)."""
    acl = render_acl(settings.federation, coordinator_user=settings.coordinator_user, sites=sites,
                     observers=settings.observer_users, bridges=bridges,
                     workers=workers_module.worker_users(settings.coordinator_user, settings.workers))
    write_text(settings.acl_path, acl, mode=0o640)
    write_text(settings.conf_path, render_conf(settings), mode=0o640)
    if account is not None:
        secure(settings, account)
