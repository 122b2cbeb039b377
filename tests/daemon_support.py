"""Test doubles and set-up for the daemon's tests: a small coordinator that speaks the wire format,
site folders with keys, and configurations with tiny models."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fednca.config import ModelConfig, TrainConfig, preset, train_preset
from fednca.keys import CoordinatorKeys, Registry, SiteKeys, write_coordinator_keys, write_site_keys
from fednca.topics import Topics
from fednca.transport.base import Client
from fednca.wire import WireError, check_update, make_announcement, make_receipt, verify_update
from fednca_daemon import config as dc

TINY_MODEL = preset(input_size=16, steps=(3, 2), hidden=16)
TINY_TRAIN = train_preset(batch_size=2, local_epochs=10)


def tiny_weights(cfg: ModelConfig = TINY_MODEL, seed: int = 0) -> dict[str, np.ndarray]:
    from fednca.model import build, tensors

    return {k: v.numpy() for k, v in tensors(build(cfg, seed=seed)).items()}


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail after ``timeout`` seconds (a bound, not a measurement)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Received:
    site: str
    round: int
    update_id: str
    steps: int
    partial: bool
    samples: int
    delta: dict[str, np.ndarray]
    metrics: dict[str, float]


@dataclass
class FakeCoordinator:
    """Announces rounds, verifies updates and answers each with a signed receipt.

    Counts an update once per (site, round): the same update id again is acknowledged again,
    another update id from the same site and round is rejected as ``duplicate_site``.
    """

    client: Client
    federation: str
    keys: CoordinatorKeys
    registry: Registry
    model: ModelConfig = TINY_MODEL
    train: TrainConfig = TINY_TRAIN
    round: int = -1
    model_sha256: str = ""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    accepted: dict[tuple[str, int], Received] = field(default_factory=dict)
    deliveries: list[tuple[str, str]] = field(default_factory=list)  # (site, update id) per delivery
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (site, reason)
    receipts: bool = True
    clock: Callable[[], float] | None = None  # set: announcements carry seconds_left by this clock

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self.client.subscribe(self.topics.all_updates, qos=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def announce(self, *, round: int, deadline: float, weights: dict[str, np.ndarray]) -> bytes:
        from fednca.wire import model_sha256

        left = None if self.clock is None else max(int(deadline) - int(self.clock()), 0)
        payload = make_announcement(federation=self.federation, round=round, deadline=int(deadline), quorum=1,
                                    train=self.train, model=self.model, tensors=weights,
                                    signing_key=self.keys.signing, seconds_left=left)
        self.round, self.model_sha256 = round, model_sha256(weights)
        self.shapes = {k: v.shape for k, v in weights.items()}
        self.client.publish(self.topics.round, payload, qos=1, retain=True).result(5.0)
        return payload

    def handle(self, timeout: float = 0.1) -> bool:
        m = self.client.receive(timeout)
        if m is None:
            return False
        site = self.topics.parse(m.topic).site
        assert site is not None
        try:
            verified = verify_update(m.payload, topic_site=site, coordinator_keys=self.keys.box,
                                     registry=self.registry)
            h = verified.header
            self.deliveries.append((site, h.update_id))
            earlier = self.accepted.get((site, h.round))
            if earlier is not None and earlier.update_id == h.update_id:
                self._receipt(site, h.round, h.update_id, None)
            elif earlier is not None:
                self._receipt(site, h.round, h.update_id, "duplicate_site")
            elif h.round != self.round:
                self._receipt(site, h.round, h.update_id, "stale_round")
            else:
                u = check_update(verified, federation=self.federation, round=self.round,
                                 base_sha256=self.model_sha256, shapes=self.shapes)
                self.accepted[(site, h.round)] = Received(site, h.round, h.update_id, h.steps, h.partial, h.samples,
                                                          {k: np.array(v) for k, v in u.delta.items()},
                                                          dict(h.metrics))
                self._receipt(site, h.round, h.update_id, None)
        except WireError as e:
            self.rejected.append((site, str(e.reason)))
            if e.header is not None:
                self._receipt(site, e.header.round, e.header.update_id, str(e.reason))
        finally:
            self.client.ack(m)
        return True

    def _receipt(self, site: str, rnd: int, uid: str, reason: str | None) -> None:
        if reason is not None:
            self.rejected.append((site, reason))
        if self.receipts:
            payload = make_receipt(federation=self.federation, site=site, round=rnd, update_id=uid, reason=reason,
                                   signing_key=self.keys.signing)
            self.client.publish(self.topics.receipts(site), payload, qos=1)

    def start(self) -> "FakeCoordinator":
        def loop() -> None:
            while not self._stop.is_set():
                self.handle(0.05)

        self._thread = threading.Thread(target=loop, name="fake-coordinator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class Federation:
    """Keys of a coordinator and of its sites, written under ``root``."""

    root: Path
    federation: str = "fed"
    sites: tuple[str, ...] = ("site-a",)

    def __post_init__(self) -> None:
        self.coordinator = CoordinatorKeys.generate()
        write_coordinator_keys(self.root / "coordinator-private", self.coordinator)
        public = self.root / "coordinator"
        public.mkdir(mode=0o700)
        for name in ("signing.pub", "box.pub"):
            (public / name).write_bytes((self.root / "coordinator-private" / name).read_bytes())
        self.site_keys = {s: SiteKeys.generate() for s in self.sites}
        for s, k in self.site_keys.items():
            write_site_keys(self.root / s / "keys", k)
        self.registry = Registry(sites={s: k.verify_key for s, k in self.site_keys.items()})

    def config_data(self, site: str = "site-a", **sections: Any) -> dict[str, Any]:
        """A configuration mapping for ``site`` with a tiny phantom dataset and short chunks."""
        data: dict[str, Any] = {
            "site": site,
            "federation": self.federation,
            "broker": {"url": "mqtt://127.0.0.1:1883", "password": "secret"},
            "keys": {"site": str(self.root / site / "keys"), "coordinator": str(self.root / "coordinator")},
            "data": {"phantom": {"site": 0, "count": 8, "seed": 0}},
            "state_dir": str(self.root / site / "state"),
            "cpu": {"threads": 1, "duty_cycle": 1.0},
            "gates": {"max_temperature_c": None, "min_battery_percent": None, "poll_s": 0.2},
            "training": {"chunk_s": 0.2, "min_steps": 5, "deadline_margin_s": 0.0, "worker_backoff_s": 0.2},
            "telemetry": {"interval_s": 30.0},
            "inference": {"export": False},  # one test turns it on: an export costs a few seconds
        }
        for name, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **value}
            else:
                data[name] = value
        return data

    def config(self, site: str = "site-a", **sections: Any) -> dc.DaemonConfig:
        return dc.parse(self.config_data(site, **sections), source="test.yaml", env={})
