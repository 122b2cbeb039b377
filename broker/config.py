"""The coordinator's configuration: one YAML file per federation, read into frozen dataclasses.

The federation folder (made by ``fednca coordinator init``) holds the file and everything the
coordinator keeps, at fixed places below it::

    coordinator.yaml    this configuration
    keys/               the coordinator's signing and box keys (0700, private keys 0600)
    registry.json       the enrolled sites and their public signing keys
    secrets/            the broker passwords (0700, files 0600): the coordinator's, and one per
                        observer account (``<user>-mqtt-password``) of the read-only views
    store/<federation>/ the round store: state, accepted updates, round log, global models
    mosquitto/          mosquitto.conf, passwd, acl and the broker's persistence folder

:func:`load_config` checks every key with the shared parser (:mod:`fednca.settings`) and raises
one :class:`ConfigFileError` (a :class:`~fednca.errors.ConfigError`) that lists every problem,
each named by its dotted key (``round.grace_s: must be a finite number >= 0``) and the file: a
wrong type, a missing or unknown key anywhere, and in each section the first value its own checks
refuse. Unknown keys are errors. ``FederationConfig`` is what the coordinator service itself needs
(no paths, no broker), so a coordinator can also be built in-process without a file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fednca.aggregate import AggregationConfig
from fednca.config import PRESETS, ModelConfig, TrainConfig, preset, train_preset
from fednca.errors import ConfigError
from fednca.settings import BAD, Parser
from fednca.topics import TopicError, check_id
from fednca.transport.base import DEFAULT_MAX_PACKET_SIZE, TransportError
from fednca.transport.mqtt import parse_url
from fednca.wire import UPDATE_ENCODINGS

from . import tls
from .downlink import MODEL_DELTAS
from .mosquitto import MosquittoSettings, TLSListener, limits_for
from .rounds import RoundConfig
from .secure_config import SecureAggregationConfig, parse_secure, secure_problems

CONFIG_NAME = "coordinator.yaml"
# The read-only observer accounts (role ``observer``): one for ``fednca status``, one for the demo's
# and the harness's monitor, so that neither view takes over the other's session.
STATUS_OBSERVER, MONITOR_OBSERVER = "fednca-status", "fednca-monitor"
OBSERVERS = (STATUS_OBSERVER, MONITOR_OBSERVER)
_MAX_CONFIG_BYTES = 1 << 20


class ConfigFileError(ConfigError):
    """The configuration file is unreadable or has invalid keys; ``problems`` lists each
    (dotted key, why), all of them."""

    heading = "problem(s) in the configuration"

    def __init__(self, path: Path, problems: list[tuple[str, str]]) -> None:
        (field_name, why), *more = problems
        super().__init__(field_name, why, more=more, source=str(path))
        self.path = path


def _positive_int(name: str, value: Any, problems: list[tuple[str, str]]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append((name, f"must be a positive integer, got {value!r}"))


def _optional_text(name: str, value: Any, problems: list[tuple[str, str]]) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        problems.append((name, f"must be a non-empty string or null, got {value!r}"))


def _refuse(problems: list[tuple[str, str]]) -> None:
    """Raise every problem a constructor found as one ConfigError, so a file names them all."""
    if problems:
        raise ConfigError.collected(problems)


@dataclass(frozen=True)
class FederationConfig:
    """What the coordinator service needs to run the rounds of one federation."""

    name: str
    rounds: RoundConfig = RoundConfig()
    max_rounds: int | None = 200  # stop after this many rounds (None: never)
    aggregation: AggregationConfig = AggregationConfig()
    model: ModelConfig = ModelConfig()
    seed: int = 0  # seed of the initial weights when the federation starts from scratch
    train: TrainConfig = TrainConfig()
    update_dtype: str = "float16"  # what sites are told to send (announced): float16, float32 or q8; all accepted
    model_delta: str = "off"  # "q8": announce each model as an 8-bit delta from the previous (broker/downlink.py)
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()  # off by default (.secure_config)

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        try:
            check_id(self.name, what="federation")
        except TopicError as e:
            problems.append(("federation", str(e)))
        if self.max_rounds is not None:
            _positive_int("max_rounds", self.max_rounds, problems)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            problems.append(("seed", f"must be an integer >= 0, got {self.seed!r}"))
        if self.update_dtype not in UPDATE_ENCODINGS:
            problems.append(("update_dtype", f"must be one of {sorted(UPDATE_ENCODINGS)}, got {self.update_dtype!r}"))
        if self.model_delta not in MODEL_DELTAS:
            problems.append(("model_delta", f"must be one of {list(MODEL_DELTAS)}, got {self.model_delta!r}"))
        problems += secure_problems(self.secure_aggregation, self.aggregation, self.rounds.mode)
        _refuse(problems)


@dataclass(frozen=True)
class BrokerConfig:
    """How the coordinator reaches the broker."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str = "coordinator"
    password_file: str = "secrets/mqtt-password"  # relative to the federation folder
    client_id: str | None = None  # None: fednca-coordinator-<federation>
    ca_file: str | None = None  # mqtts:// only: the CA that signed the broker's certificate
    cert_file: str | None = None  # mqtts:// only: a client certificate, if the broker asks for one
    key_file: str | None = None
    protocol: Literal["auto", "5", "3.1.1"] = "auto"  # auto (MQTT 5, else 3.1.1), 5 or 3.1.1
    keepalive: int = 30
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE

    def __post_init__(self) -> None:
        problems: list[tuple[str, str]] = []
        address = None
        try:
            address = parse_url(self.url) if isinstance(self.url, str) else None
            if address is None:
                problems.append(("url", f"must be a string like mqtt://host:1883, got {self.url!r}"))
        except TransportError as e:
            problems.append(("url", str(e)))
        try:
            check_id(self.username, what="username")
        except TopicError as e:
            problems.append(("username", str(e)))
        for name in ("password_file", "client_id", "ca_file", "cert_file", "key_file"):
            _optional_text(name, getattr(self, name), problems)
        if self.password_file is None:
            problems.append(("password_file", "must be given"))
        tls_files = [n for n in ("ca_file", "cert_file", "key_file") if getattr(self, n) is not None]
        if tls_files and address is not None and not address.tls:
            problems.append((tls_files[0], "is for an mqtts:// broker; the url is mqtt://"))
        if self.protocol not in ("auto", "5", "3.1.1"):
            problems.append(("protocol", f"must be auto, 5 or 3.1.1, got {self.protocol!r}"))
        _positive_int("keepalive", self.keepalive, problems)
        _positive_int("max_packet_size", self.max_packet_size, problems)
        _refuse(problems)


@dataclass(frozen=True)
class MosquittoConfig:
    """The listener and limits written into the generated mosquitto.conf."""

    address: str = "127.0.0.1"
    port: int = 1883
    max_queued_messages: int | None = None  # None: sized for the enrolled sites (mosquitto.limits_for)
    persistent_client_expiration: str = "7d"
    run_as_root: bool = False
    folder: str = "mosquitto"  # conf, passwd, acl, certificates; relative to the federation folder
    data_folder: str | None = None  # mosquitto's persistence; None: <folder>/data
    tls_names: tuple[str, ...] = ()  # non-empty: a TLS listener whose certificate names these
    user: str = "mosquitto"  # the account mosquitto drops to; it must be able to read the files
    max_inflight_messages: int | None = None  # None: sized for the enrolled sites
    bind_client_ids: bool = True  # each client's id is its user name (no session takeover); false: any id
    workers: int = 0  # broker accounts for coordinator worker processes (coordinator run --workers N)

    def __post_init__(self) -> None:
        if not isinstance(self.run_as_root, bool):
            raise ConfigError("run_as_root", f"must be true or false, got {self.run_as_root!r}")
        if not isinstance(self.bind_client_ids, bool):
            raise ConfigError("bind_client_ids", f"must be true or false, got {self.bind_client_ids!r}")
        if self.tls_names:
            tls.check_names(list(self.tls_names), field="tls_names")
        self.settings(federation="check", folder=Path("check"), coordinator_user="coordinator")

    def settings(self, *, federation: str, folder: Path, coordinator_user: str, sites: int = 0,
                 observer_users: tuple[str, ...] = ()) -> MosquittoSettings:
        queued, inflight = limits_for(sites)
        listener = TLSListener.in_folder(folder, port=self.port, address=self.address) if self.tls_names else None
        return MosquittoSettings(
            federation=federation, folder=str(folder), port=self.port, address=self.address,
            plain_listener=listener is None, tls=listener,
            coordinator_user=coordinator_user, max_queued_messages=self.max_queued_messages or queued,
            max_inflight_messages=self.max_inflight_messages or inflight, user=self.user,
            data_folder=self.data_folder, persistent_client_expiration=self.persistent_client_expiration,
            run_as_root=self.run_as_root, bind_client_ids=self.bind_client_ids, observer_users=observer_users,
            workers=self.workers,
        )  # fmt: skip


@dataclass(frozen=True)
class CoordinatorConfig:
    folder: Path  # the federation folder
    federation: FederationConfig
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    mosquitto: MosquittoConfig = field(default_factory=MosquittoConfig)

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def keys_dir(self) -> Path:
        return self.folder / "keys"

    @property
    def registry_path(self) -> Path:
        return self.folder / "registry.json"

    @property
    def store_root(self) -> Path:
        return self.folder / "store"

    @property
    def mosquitto_dir(self) -> Path:
        return self.folder / self.mosquitto.folder  # an absolute mosquitto.folder stands alone

    @property
    def broker_ca_key(self) -> Path:
        return self.keys_dir / "broker-ca.key"  # signs the broker's server certificate

    @property
    def broker_ca_cert(self) -> Path:
        return self.folder / "broker-ca.pem"  # what the coordinator and the sites trust

    @property
    def password_path(self) -> Path:
        return self.folder / self.broker.password_file

    def observer_password_path(self, user: str) -> Path:
        """The password file of one observer account (``secrets/<user>-mqtt-password``)."""
        return self.folder / "secrets" / f"{user}-mqtt-password"

    @property
    def client_id(self) -> str:
        return self.broker.client_id or f"fednca-coordinator-{self.federation.name}"

    def mosquitto_settings(self, *, sites: int = 0) -> MosquittoSettings:
        return self.mosquitto.settings(federation=self.federation.name, folder=self.mosquitto_dir,
                                       coordinator_user=self.broker.username, sites=sites,
                                       observer_users=OBSERVERS)


# -------------------------------------------------------------------------------------- the file


def to_yaml_dict(cfg: CoordinatorConfig) -> dict[str, Any]:
    """The configuration as the mapping the YAML file holds (every key, defaults included)."""
    f = cfg.federation
    base = PRESETS[f.model.preset]
    model_overrides = {k: v for k, v in f.model.to_dict().items() if k != "preset" and base.get(k, _DEFAULT_MODEL[k]) != v}
    return {
        "federation": f.name,
        "broker": _plain(dataclasses.asdict(cfg.broker)),
        "round": {**_plain(f.rounds.to_dict()), "max_rounds": f.max_rounds},
        "aggregation": _plain(dataclasses.asdict(f.aggregation)),
        "model": {"preset": f.model.preset, "seed": f.seed, **_plain(model_overrides)},
        "train": _plain(f.train.to_dict()),
        "update_dtype": f.update_dtype,
        "model_delta": f.model_delta,
        "secure_aggregation": f.secure_aggregation.to_yaml(),
        "mosquitto": _plain(dataclasses.asdict(cfg.mosquitto)),
    }


_DEFAULT_MODEL = ModelConfig().to_dict()


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def load_config(path: str | Path) -> CoordinatorConfig:
    """Read ``coordinator.yaml``; every problem found is listed in one :class:`ConfigFileError`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigFileError(path, [("(file)", f"cannot read the file ({e.strerror})")]) from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigFileError(path, [("(file)", f"larger than {_MAX_CONFIG_BYTES} bytes")])
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigFileError(path, [("(file)", f"{where}not valid YAML ({getattr(e, 'problem', None) or e})")]) from None
    return parse_config(data, folder=path.resolve().parent, path=path)


_SECTIONS = ("federation", "broker", "round", "aggregation", "model", "train", "update_dtype", "model_delta",
             "secure_aggregation",
             "mosquitto")

# Fields of FederationConfig that the file holds under another key.
_KEY_OF_FIELD = {"name": "federation", "max_rounds": "round.max_rounds", "seed": "model.seed"}


def parse_config(data: Any, *, folder: Path, path: Path | None = None) -> CoordinatorConfig:
    """The configuration from the file's parsed YAML; raises ConfigFileError listing every problem.

    The file's layout differs from the objects' in three places (the federation id, the round
    limit and the initial seed live in sections of their own objects), so those are taken out
    before each section goes through the shared parser, and named by their file keys.
    """
    where = path or folder / CONFIG_NAME
    if not isinstance(data, dict):
        raise ConfigFileError(where, [("(top level)", "the file must hold a mapping of keys (federation:, broker:, ...)")])
    parser = Parser()
    problems = parser.problems
    for name in sorted(set(map(str, data)) - set(_SECTIONS)):
        problems.add(name, f"unknown key (known here: {', '.join(_SECTIONS)})")
    name = data.get("federation")
    try:
        check_id(name, what="federation")
    except TopicError as e:
        problems.add("federation", "missing (the federation id)" if name is None else str(e))
        name = None
    round_data = dict(_mapping(data.get("round"), "round", parser))
    max_rounds = round_data.pop("max_rounds", FederationConfig.max_rounds)
    model_data = dict(_mapping(data.get("model"), "model", parser))
    seed = model_data.pop("seed", 0)
    preset_name = model_data.pop("preset", "fednca")
    if not isinstance(preset_name, str) or preset_name not in PRESETS:
        problems.add("model.preset", f"unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
        preset_name = "fednca"
    sections = {
        "rounds": parser.section(RoundConfig, round_data, "round"),
        "aggregation": parser.section(AggregationConfig, _mapping(data.get("aggregation"), "aggregation", parser),
                                      "aggregation"),
        "model": parser.section(ModelConfig, model_data, "model", make=lambda **kw: preset(preset_name, **kw)),
        "train": parser.section(TrainConfig, _mapping(data.get("train"), "train", parser), "train",
                                make=lambda **kw: train_preset(preset_name, **kw)),
    }
    broker = parser.section(BrokerConfig, _mapping(data.get("broker"), "broker", parser), "broker")
    mosquitto = parser.section(MosquittoConfig, _mapping(data.get("mosquitto"), "mosquitto", parser), "mosquitto")
    top = {"name": name or "check", "max_rounds": max_rounds, "seed": seed,
           "update_dtype": data.get("update_dtype", FederationConfig.update_dtype),
           "model_delta": data.get("model_delta", FederationConfig.model_delta)}
    try:
        top["secure_aggregation"] = parse_secure(data.get("secure_aggregation"))
    except ConfigError as e:
        problems.add(e.field, e.why)
    complete = {key: value for key, value in sections.items() if value is not BAD}
    federation = problems.build("", FederationConfig, {**top, **complete}, keys=_KEY_OF_FIELD)
    if problems:
        raise ConfigFileError(where, problems.items)
    assert federation is not BAD and broker is not BAD and mosquitto is not BAD
    return CoordinatorConfig(folder=folder, federation=federation, broker=broker, mosquitto=mosquitto)


def _mapping(value: Any, where: str, parser: Parser) -> dict[str, Any]:
    """A section's mapping; an absent section is empty (every key at its default)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        parser.problems.add(where, f"must be a mapping of keys, got {type(value).__name__}")
        return {}
    return value
