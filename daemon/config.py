"""The daemon's configuration: one YAML file (``/etc/fednca/daemon.yaml``) -> frozen dataclasses.

Every key is a dataclass field whose metadata carries its check and a one-line description;
:func:`parse` walks the mapping with the core's shared parser (:mod:`fednca.settings`), converts
each value, and collects *every* problem (unknown key, wrong type, value out of range, missing
required key) before raising one :class:`DaemonConfigError` (a
:class:`~fednca.errors.ConfigError`) that lists them, each named by its dotted key and the file.

Secrets may come from systemd credentials (``LoadCredential=`` puts them in
``$CREDENTIALS_DIRECTORY``): a path value may start with ``$CREDENTIALS_DIRECTORY/`` (or
``${CREDENTIALS_DIRECTORY}/``), and when the file does not name them, the MQTT password is
read from ``$CREDENTIALS_DIRECTORY/mqtt-password`` and the site key folder is
``$CREDENTIALS_DIRECTORY`` itself if it holds ``signing.key``. Relative paths are taken
from the configuration file's folder.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from fednca import settings
from fednca.errors import ConfigError
from fednca.settings import BAD, Parser, Problems, key, to_dict  # noqa: F401  (to_dict: `--print-config`)
from fednca.topics import TopicError, check_id

from .gates import WindowError, parse_window

DEFAULT_PATH = Path("/etc/fednca/daemon.yaml")
CREDENTIALS_VAR = "CREDENTIALS_DIRECTORY"
PASSWORD_CREDENTIAL = "mqtt-password"
SITE_KEY_CREDENTIAL = "signing.key"
_MAX_FILE = 1 << 20
_MAX_PASSWORD = 4096

_between = settings.between


class DaemonConfigError(ConfigError):
    """The configuration file has problems; ``problems`` lists (key, why), all of them."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        (field_name, why), *more = problems
        super().__init__(field_name, why, more=more, source=source)


def _site_id(v: Any) -> str | None:
    try:
        check_id(v, what="id")
    except TopicError as e:
        return str(e)
    return None


def _windows(v: Any) -> str | None:
    for i, text in enumerate(v):
        try:
            parse_window(text)
        except WindowError as e:
            return f"[{i}]: {e}"
    return None


# ------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class TLSConfig:
    ca_file: Path | None = key(None, doc="CA certificate that signs the broker's (system CAs when empty)")
    cert_file: Path | None = key(None, doc="client certificate, when the broker asks for one")
    key_file: Path | None = key(None, doc="private key of the client certificate")


@dataclass(frozen=True)
class BrokerConfig:
    url: str = key(doc="mqtt://host:1883 or mqtts://host:8883 (TLS)")
    username: str | None = key(None, doc="MQTT user name (empty: the site id)")
    password: str | None = key(None, doc="MQTT password (prefer password_file or a credential)", secret=True)
    password_file: Path | None = key(
        None, doc="file holding the MQTT password (empty: $CREDENTIALS_DIRECTORY/mqtt-password if present)")
    keepalive_s: int = key(30, doc="MQTT keep-alive in seconds", check=_between(5, 3600))
    tls: TLSConfig = key(TLSConfig, doc="TLS files, for an mqtts:// broker")


@dataclass(frozen=True)
class KeysConfig:
    site: Path = key(Path("/etc/fednca/keys"),
                     doc="folder holding the site's signing.key (0600); $CREDENTIALS_DIRECTORY if it holds one")
    coordinator: Path = key(Path("/etc/fednca/coordinator"),
                            doc="folder holding the coordinator's signing.pub and box.pub")


@dataclass(frozen=True)
class PhantomConfig:
    site: int = key(0, doc="phantom site number (its domain shift)", check=_between(0, 10**6))
    count: int = key(64, doc="phantom images", check=_between(1, 100_000))
    seed: int = key(0, doc="phantom seed", check=_between(0, 2**32 - 1))


@dataclass(frozen=True)
class DataConfig:
    folder: Path | None = key(None, doc="dataset folder of images/ and masks/")
    phantom: PhantomConfig | None = key(None, doc="instead of a folder: phantom images (demos)")
    skip_bad: bool = key(False, doc="skip unreadable image/mask pairs instead of failing")
    test_fraction: float = key(0.1, doc="share held out (by patient) for the local test Dice sent with each update (0: none)",
                                check=_between(0.0, 0.9))


@dataclass(frozen=True)
class CpuConfig:
    threads: int = key(1, doc="compute threads of the trainer (BLAS, or PyTorch's)", check=_between(1, 256))
    duty_cycle: float = key(0.5, doc="share of the time spent computing: rests t*(1-d)/d after t seconds of CPU",
                            check=_between(0.0, 1.0, low_open=True))


@dataclass(frozen=True)
class GatesConfig:
    max_temperature_c: float | None = key(75.0, doc="pause at or above this temperature (empty: no gate)",
                                          check=_between(20.0, 150.0))
    temperature_hysteresis_c: float = key(5.0, doc="resume once this far below the maximum",
                                          check=_between(0.0, 50.0))
    min_battery_percent: float | None = key(30.0, doc="pause below this charge when not charging (empty: no gate)",
                                            check=_between(0.0, 100.0))
    battery_hysteresis_percent: float = key(10.0, doc="resume once this far above the minimum",
                                            check=_between(0.0, 100.0))
    windows: tuple[str, ...] = key((), doc='local times when training may run, e.g. ["22:00-06:00"] (empty: always)',
                                   check=_windows)
    poll_s: float = key(30.0, doc="seconds between sensor readings", check=_between(0.0, 3600.0, low_open=True))


@dataclass(frozen=True)
class TrainingConfig:
    chunk_s: float = key(5.0, doc="seconds of training between checkpoints (the watchdog is pinged between "
                                  "chunks: keep it well under WatchdogSec)", check=_between(0.05, 120.0))
    min_steps: int = key(10, doc="least optimiser steps for a partial update at the deadline",
                         check=_between(1, 10**9))
    deadline_margin_s: float = key(60.0, doc="submit this long before the round's deadline",
                                   check=_between(0.0, 86400.0))
    trainer: Literal["numpy", "torch"] = key(
        "numpy", doc="numpy: the site's trainer, no PyTorch needed; torch: the reference trainer "
                     "(needs the [torch] extra; also for the Med-NCA preset)")
    low_memory: bool = key(True, doc="torch trainer: recompute NCA steps in the backward pass (less memory, "
                                     "more time); the numpy trainer always does")
    seed: int | None = key(None, doc="training seed (empty: derived from the site id)", check=_between(0, 2**63 - 1))
    delta_dtype: Literal["float16", "float32"] = key("float16", doc="dtype of the weight delta on the wire")
    worker_backoff_s: float = key(10.0, doc="wait after a failed trainer, doubling up to an hour",
                                  check=_between(0.0, 3600.0))


@dataclass(frozen=True)
class OutboxConfig:
    resend_s: float = key(900.0, doc="longest wait for a receipt before a stored update is published again "
                                       "(the first resend comes sooner: docs/daemon.md)",
                          check=_between(1.0, 86400.0 * 7))


@dataclass(frozen=True)
class TelemetryConfig:
    interval_s: float = key(60.0, doc="seconds between status messages (also sent on every state change)",
                            check=_between(0.0, 86400.0, low_open=True))


@dataclass(frozen=True)
class InferenceConfig:
    export: bool = key(True, doc="keep the newest verified global model as STATE_DIR/inference/model.onnx "
                                 "for 'fednca segment'")


@dataclass(frozen=True)
class DaemonConfig:
    site: str = key(doc="this site's id (its MQTT user name by default)", check=_site_id)
    federation: str = key(doc="federation id", check=_site_id)
    broker: BrokerConfig = key(doc="the federation's MQTT broker")
    data: DataConfig = key(doc="the site's images: folder or phantom")
    keys: KeysConfig = key(KeysConfig, doc="key folders")
    state_dir: Path = key(Path("/var/lib/fednca"), doc="checkpoint, outbox and round state (0700)")
    cpu: CpuConfig = key(CpuConfig, doc="CPU budget")
    gates: GatesConfig = key(GatesConfig, doc="conditions under which training pauses")
    training: TrainingConfig = key(TrainingConfig, doc="chunked local training")
    outbox: OutboxConfig = key(OutboxConfig, doc="stored updates awaiting a receipt")
    telemetry: TelemetryConfig = key(TelemetryConfig, doc="status messages on status/<site>")
    inference: InferenceConfig = key(InferenceConfig, doc="the on-device inference model")
    source: str = field(default="<memory>", compare=False, metadata={"internal": True})

    @property
    def mqtt_username(self) -> str:
        return self.broker.username or self.site

    @property
    def seed(self) -> int:
        """The training seed: configured, else a stable number derived from the site id."""
        if self.training.seed is not None:
            return self.training.seed
        return zlib.crc32(self.site.encode())


# ---------------------------------------------------------------------------------------- parsing


class _Parser(Parser):
    """The shared parser, with paths that may name ``$CREDENTIALS_DIRECTORY``."""

    def __init__(self, *, base: Path, env: Mapping[str, str], problems: Problems) -> None:
        super().__init__(problems=problems, base=base)
        self.env = env

    def path(self, text: str, where: str) -> Any:
        for form in ("${" + CREDENTIALS_VAR + "}", "$" + CREDENTIALS_VAR):
            if text == form or text.startswith(form + "/"):
                creds = self.env.get(CREDENTIALS_VAR)
                if not creds:
                    self.problems.add(where, f"refers to ${CREDENTIALS_VAR}, which is not set "
                                             "(it is set by systemd for a unit with LoadCredential=)")
                    return BAD
                return Path(creds + text[len(form):])
        return super().path(text, where)


def parse(data: Any, *, source: str = "<memory>", base: Path | None = None,
          env: Mapping[str, str] | None = None) -> DaemonConfig:
    """A configuration from a parsed YAML mapping; raises DaemonConfigError listing every problem."""
    env = os.environ if env is None else env
    problems = Problems()
    base = base if base is not None else Path.cwd()
    cfg = _Parser(base=base, env=env, problems=problems).section(DaemonConfig, data, "")
    if cfg is not BAD:
        cfg = _cross_checks(cfg, env, problems)
    if problems.items:
        raise DaemonConfigError(source, problems.items)
    return dataclasses.replace(cfg, source=source)


def _cross_checks(cfg: DaemonConfig, env: Mapping[str, str], problems: Problems) -> DaemonConfig:
    from fednca.transport.mqtt import parse_url  # paho: only once the file is otherwise sound

    from fednca.transport.base import TransportError

    b = cfg.broker
    try:
        address = parse_url(b.url)
        if not address.tls and any(getattr(b.tls, f.name) is not None for f in dataclasses.fields(b.tls)):
            problems.add("broker.tls", "TLS files are given but the url is mqtt://; use mqtts://")
    except TransportError as e:
        problems.add("broker.url", str(e))
    if b.password is not None and b.password_file is not None:
        problems.add("broker.password", "give password or password_file, not both")
    if (cfg.data.folder is None) == (cfg.data.phantom is None):
        problems.add("data", "give exactly one of folder or phantom")
    g = cfg.gates
    if g.max_temperature_c is not None and g.temperature_hysteresis_c >= g.max_temperature_c:
        problems.add("gates.temperature_hysteresis_c", "must be below max_temperature_c")
    creds = env.get(CREDENTIALS_VAR)
    if creds and b.password is None and b.password_file is None and (Path(creds) / PASSWORD_CREDENTIAL).is_file():
        cfg = dataclasses.replace(cfg, broker=dataclasses.replace(b, password_file=Path(creds) / PASSWORD_CREDENTIAL))
    if creds and cfg.keys.site == KeysConfig().site and (Path(creds) / SITE_KEY_CREDENTIAL).is_file():
        cfg = dataclasses.replace(cfg, keys=dataclasses.replace(cfg.keys, site=Path(creds)))
    return cfg


def load(path: str | os.PathLike, *, env: Mapping[str, str] | None = None) -> DaemonConfig:
    """Read and parse a configuration file; the password file, if any, is read too."""
    path = Path(path)
    cfg, mode = read(path, env=env)
    if cfg.broker.password is not None and stat.S_IMODE(mode) & 0o004:
        raise DaemonConfigError(str(path), [("broker.password", "the file holds a password and anyone can read it: "
                                             f"chmod o-r {path}, or use password_file")])
    if cfg.broker.password_file is not None:
        cfg = dataclasses.replace(cfg, broker=dataclasses.replace(
            cfg.broker, password=read_password(cfg.broker.password_file, str(path))))
    return cfg


def read(path: Path, *, env: Mapping[str, str] | None = None) -> tuple[DaemonConfig, int]:
    """The parsed configuration and the file's mode, secrets not yet read: what ``load`` checks
    them against, and what ``--check-config`` starts from to report every problem at once."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE + 1)
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise DaemonConfigError(str(path), [("(file)", f"cannot read: {e.strerror}")]) from None
    if len(raw) > _MAX_FILE:
        raise DaemonConfigError(str(path), [("(file)", f"larger than {_MAX_FILE} bytes")])
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DaemonConfigError(str(path), [("(file)", f"not valid YAML: {e}")]) from None
    return parse(data, source=str(path), base=path.parent.resolve(), env=env), mode


def read_password(path: Path, source: str) -> str:
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(_MAX_PASSWORD + 1)
    except OSError as e:
        raise DaemonConfigError(source, [("broker.password_file", f"{path}: cannot read: {e.strerror}")]) from None
    if mode & 0o077:
        raise DaemonConfigError(source, [("broker.password_file", f"{path} is readable by group or others "
                                          f"(mode {mode & 0o777:04o}); fix it with: chmod 600 {path}")])
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        text = ""
    if not text or len(raw) > _MAX_PASSWORD or "\n" in text:
        raise DaemonConfigError(source, [("broker.password_file", f"{path}: must hold one line, the password")])
    return text


# ------------------------------------------------------------------------------------- printing


def reference(cls: type = DaemonConfig, where: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every key, for the documentation."""
    return settings.reference(cls, where)

