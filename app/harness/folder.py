"""A federation folder made as an operator makes one: ``fednca coordinator init``, then ``enroll``.

:func:`set_up` runs the real commands (so the coordinator configuration, keys, registry and
mosquitto files are exactly an operator's), then gives each site its signing keys, its enrolment
bundle and a daemon YAML, with the model and training configuration the caller chose (the demo's,
or a tiny one for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .processes import HarnessError


@dataclass(frozen=True)
class SitePaths:
    name: str
    config: Path  # the daemon's YAML
    keys: Path  # its signing key folder
    bundle: Path  # what enrolment gave it: coordinator public keys, MQTT password

    @property
    def state_dir(self) -> Path:
        return self.config.parent / "state"


@dataclass(frozen=True)
class FederationFolder:
    """What :func:`set_up` made: the coordinator's folder and each site's files."""

    folder: Path
    sites: tuple[SitePaths, ...]

    def config(self) -> Any:
        """The coordinator's configuration (``fednca_broker.config.CoordinatorConfig``)."""
        from fednca_broker.config import CONFIG_NAME, load_config

        return load_config(self.folder / CONFIG_NAME)

    def site(self, name: str) -> SitePaths:
        return next(s for s in self.sites if s.name == name)

    @property
    def monitor_user(self) -> str:
        """The observer account the harness's monitor reads the sites' telemetry with."""
        from fednca_broker.config import MONITOR_OBSERVER

        return MONITOR_OBSERVER

    def password(self, user: str) -> str:
        """The MQTT password of the coordinator's broker user, of an observer account or of a site."""
        from fednca_broker.config import OBSERVERS

        cfg = self.config()
        if user == cfg.broker.username:
            return cfg.password_path.read_text().strip()
        if user in OBSERVERS:
            return cfg.observer_password_path(user).read_text().strip()
        return (self.site(user).bundle / "mqtt-password").read_text().strip()


def _quiet(argv: list[str]) -> str:
    from ..cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if main(argv) != 0:
            raise HarnessError(f"'fednca {' '.join(argv[:2])}' failed")
    return out.getvalue()


def set_up(root: Path, *, federation: str, sites: int, rounds: int, quorum: int, url: str, model: Any,
           train: Any, grace: float, train_images: int, seed: int = 0, chunk_s: float = 2.0,
           telemetry_s: float = 2.0, site_urls: Mapping[str, str] | None = None,
           initial_model: Path | None = None, wire: Mapping[str, str] | None = None,
           trainer: str | None = None, aggregation: Any = None,
           round_settings: Mapping[str, Any] | None = None, secure_aggregation: bool = False) -> FederationFolder:
    """A federation folder under ``root`` (``coordinator/``, ``site0/``...) made as an operator would.

    ``model`` and ``train`` (``fednca.config`` objects) replace the preset's; rounds last up to 30
    minutes (extended by 10), closing ``grace`` s after the quorum. Site ``i`` trains on phantom
    site ``i`` (``train_images`` images, seeded by ``seed``, its trainer by ``seed + i``) with one
    thread, no gates and no ONNX export. ``site_urls`` gives a site another broker address (a
    relay); the others use ``url``, which the coordinator's configuration and broker files name.
    ``initial_model`` (a model folder of ``fednca.modelfile`` whose configuration is ``model``) is
    the first global model instead of fresh weights (``coordinator init --model``). ``wire``
    sets the federation's ``update_dtype`` and ``model_delta`` (coordinator.yaml) where given;
    ``trainer`` the sites' ``training.trainer`` (the daemon's default, numpy, when not given);
    ``aggregation`` (a ``fednca.aggregate.AggregationConfig``) the coordinator's, where given;
    ``round_settings`` further ``round`` keys of coordinator.yaml (``mode: async``, ...).
    ``secure_aggregation`` turns it on (with plain FedAvg, the rule it allows) and gives every
    site a batch of round keys as an operator would (``fednca keys round-keys``, then
    ``fednca coordinator round-keys``).
    """
    from fednca_broker.config import to_yaml_dict

    from fednca import keys as k
    from fednca.atomic import write_text

    root = root.resolve()  # the daemons' YAML files name paths: make them absolute
    coordinator = root / "coordinator"
    _quiet(["coordinator", "init", str(coordinator), "--federation", federation, "--broker", url,
            "--quorum", str(quorum), "--max-rounds", str(rounds), "--seed", str(seed),
            *(["--model", str(initial_model)] if initial_model is not None else [])])
    made = FederationFolder(folder=coordinator, sites=())
    cfg = made.config()
    fed = dataclasses.replace(
        cfg.federation, model=model, train=train,
        rounds=dataclasses.replace(cfg.federation.rounds, grace_s=grace, round_s=1800.0, extension_s=600.0,
                                   **dict(round_settings or {})),
        **dict(wire or {}), **({"aggregation": aggregation} if aggregation is not None else {}),
    )
    if secure_aggregation:
        from fednca.aggregate import AggregationConfig
        from fednca_broker.secure_config import SecureAggregationConfig

        fed = dataclasses.replace(fed, secure_aggregation=SecureAggregationConfig(enabled=True),
                                  aggregation=AggregationConfig(method="fedavg", clip_norm=None,
                                                                median_norm_factor=None, max_weight_ratio=None))
    cfg = dataclasses.replace(cfg, federation=fed)
    write_text(cfg.config_path, yaml.safe_dump(to_yaml_dict(cfg), sort_keys=False), mode=0o640)
    paths = []
    for i in range(sites):
        name = f"site{i}"
        folder = root / name
        keys = k.SiteKeys.generate()
        k.write_site_keys(folder / "keys", keys)
        _quiet(["coordinator", "enroll", str(coordinator), name, bytes(keys.verify_key).hex(),
                "--out", str(folder / "bundle")])
        daemon = {
            "site": name, "federation": federation,
            "broker": {"url": (site_urls or {}).get(name, url), "password_file": str(folder / "bundle" / "mqtt-password")},
            "data": {"phantom": {"site": i, "count": train_images, "seed": seed},
                     "test_fraction": 0.0},  # the demo scores every site on test patients of its own
            "keys": {"site": str(folder / "keys"), "coordinator": str(folder / "bundle")},
            "state_dir": str(folder / "state"),
            "cpu": {"threads": 1, "duty_cycle": 1.0},
            "gates": {"max_temperature_c": None, "min_battery_percent": None},
            "training": {"chunk_s": chunk_s, "min_steps": 1, "deadline_margin_s": 5.0, "low_memory": False,
                         "seed": seed + i, **({"trainer": trainer} if trainer else {})},
            "telemetry": {"interval_s": telemetry_s},
            "inference": {"export": False},  # whoever runs the harness evaluates the models itself
        }  # fmt: skip
        write_text(folder / "daemon.yaml", yaml.safe_dump(daemon, sort_keys=False), mode=0o600)
        if secure_aggregation:
            _quiet(["keys", "round-keys", str(folder / "keys"), "--site", name, "--count", "16"])
            _quiet(["coordinator", "round-keys", str(coordinator), name, str(folder / "keys" / "round-keys.pub")])
        paths.append(SitePaths(name=name, config=folder / "daemon.yaml", keys=folder / "keys",
                               bundle=folder / "bundle"))
    return FederationFolder(folder=coordinator, sites=tuple(paths))


