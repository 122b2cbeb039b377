"""Coordinator worker processes: each one's loop (``fednca coordinator worker``), the supervisor
that keeps them running beside the aggregator, and the retirement of the broker sessions of
worker accounts that ``run`` does not run now (:mod:`.workers` has the worker itself, its record
and its accounts).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .errors import BrokerError
from .store import RoundStore
from .workers import Worker, record_key, shared_updates, worker_password_path, worker_user

log = logging.getLogger("fednca.coordinator.worker")


@dataclass
class Supervised:
    index: int
    process: Any  # subprocess.Popen
    restarts: int = 0


def supervise(commands: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None,
              once: Sequence[str] = ()) -> "Supervisor":
    """Start one process per command; :meth:`Supervisor.check` restarts any that died (without
    the environment variables ``once`` names)."""
    return Supervisor(commands, env=env, once=once)


class Supervisor:
    """Worker processes that the aggregator's loop keeps running: a worker that exits (or is
    killed) is started again with the same command, so its persistent session, and the updates
    it held unacknowledged, come back."""

    def __init__(self, commands: Sequence[Sequence[str]], *, env: Mapping[str, str] | None = None,
                 once: Sequence[str] = ()) -> None:
        import subprocess

        self._popen = subprocess.Popen
        self._commands = [list(c) for c in commands]
        self._env = dict(os.environ if env is None else env)
        self.workers = [Supervised(i, self._popen(c, env=self._env)) for i, c in enumerate(self._commands)]
        for name in once:  # variables for the first start only (a test's kill hook)
            self._env.pop(name, None)

    def check(self) -> list[int]:
        """Restart the workers that exited; return their indices."""
        restarted = []
        for w in self.workers:
            if w.process.poll() is not None:
                log.warning("worker %d exited with %s; starting it again", w.index + 1, w.process.returncode)
                w.process = self._popen(self._commands[w.index], env=self._env)
                w.restarts += 1
                restarted.append(w.index)
        return restarted

    def stop(self, timeout: float = 10.0) -> None:
        import signal
        import subprocess

        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                w.process.kill()
                w.process.wait()



# -- the worker process ---------------------------------------------------------------------------


def _worker_client(cfg: Any, user: str, *, clean_start: bool) -> Any:
    """An (unconnected) client of worker account ``user``; its client id is the user name."""
    from fednca.transport.mqtt import MqttClient, TLSOptions

    from .clients import read_secret

    b = cfg.broker
    tls = TLSOptions(b.ca_file, b.cert_file, b.key_file) if b.url.startswith("mqtts://") else None
    return MqttClient(url=b.url, client_id=user, username=user,
                      password=read_secret(cfg, worker_password_path(cfg.folder, user), key=f"worker {user}"),
                      tls=tls, keepalive=b.keepalive, max_packet_size=b.max_packet_size, protocol=b.protocol,
                      clean_start=clean_start)  # fmt: skip


def _open_worker(cfg: Any, index: int, *, after_action: Callable[[str], None] | None = None) -> tuple["Worker", Any]:
    """Worker ``index`` of the federation configured by ``cfg`` and its (unconnected) client."""
    from fednca.keys import read_coordinator_keys, read_registry
    from fednca.wire import max_update_bytes

    if not 1 <= index <= cfg.mosquitto.workers:
        raise BrokerError(f"worker {index}: the configuration has broker accounts for workers 1 to "
                          f"{cfg.mosquitto.workers} (mosquitto.workers; then run fednca coordinator broker-config)")
    user = worker_user(cfg.broker.username or "coordinator", index)
    client = _worker_client(cfg, user, clean_start=False)
    store = RoundStore(root=cfg.store_root, federation=cfg.federation.name)
    rounds = store.model_rounds()
    if not rounds:
        raise BrokerError(f"{store.folder}: no global model yet; start the coordinator first")
    shapes = {name: tuple(a.shape) for name, a in store.load_model(rounds[0]).items()}
    worker = Worker(name=user, federation=cfg.federation.name, client=client, store=store,
                    keys=read_coordinator_keys(cfg.keys_dir), registry=read_registry(cfg.registry_path),
                    key=record_key(cfg.keys_dir), shapes=shapes, max_update_bytes=max_update_bytes(shapes),
                    after_action=after_action)  # fmt: skip
    return worker, client


def run_worker(folder: Path, index: int, *, poll: float = 1.0, stop: Callable[[], bool] = lambda: False,
               after_action: Callable[[str], None] | None = None) -> int:
    """One worker process of the federation in ``folder`` (``fednca coordinator worker``): until
    ``stop()`` holds, take shared updates; the registry is read again when its file changes."""
    from fednca.keys import read_registry

    from .config import CONFIG_NAME, load_config

    cfg = load_config(Path(folder) / CONFIG_NAME)
    worker, client = _open_worker(cfg, index, after_action=after_action)
    registry_path = cfg.registry_path
    seen = registry_path.stat().st_mtime_ns
    worker.start()
    log.info("worker %s: sharing %s", worker.name, shared_updates(cfg.federation.name))
    try:
        while not stop():
            worker.step(poll)
            mtime = registry_path.stat().st_mtime_ns
            if mtime != seen:
                seen, worker.registry = mtime, read_registry(registry_path)
    finally:
        worker.close()
        client.disconnect()
    return 0


def retire_workers(folder: Path, first: int, *, quiet: float = 1.0, timeout: float = 10.0) -> int:
    """Empty and end the broker sessions of worker accounts ``first`` up to ``mosquitto.workers``
    (``run --workers N`` retires those past N); return how many updates they still held.

    A worker's session is persistent (7 days) and stays a member of the shared subscription while
    its process is gone, so mosquitto keeps handing it its share of the updates, which nobody would
    take. Ending the session at once (a clean start) would not hand them back: mosquitto 2.0
    discards the messages queued for a session it ends. So each account is first drained as a
    worker: it leaves the shared subscription (no new updates come to it; those queued still do),
    handles what it is handed until ``quiet`` s pass without a message (verified, stored,
    forwarded to the aggregator, acknowledged), and only then is its session ended. An account the
    broker does not let in within ``timeout`` s is left as it is, with a warning."""
    from .config import CONFIG_NAME, load_config

    cfg = load_config(Path(folder) / CONFIG_NAME)
    handed = 0
    for index in range(max(first, 1), cfg.mosquitto.workers + 1):
        user = worker_user(cfg.broker.username or "coordinator", index)
        if not worker_password_path(cfg.folder, user).exists():
            continue  # never given a password: the broker never had this account
        worker, client = _open_worker(cfg, index)
        before = handed
        try:
            if not client.connect(timeout):
                log.warning("worker %s: the broker did not let it in (%s); its session, if any, is kept",
                            user, client.last_error)
                continue
            client.unsubscribe(shared_updates(cfg.federation.name))
            while (n := worker.step(quiet)) > 0:
                handed += n
        finally:
            worker.close()
            client.disconnect()
        ender = _worker_client(cfg, user, clean_start=True)  # session expiry 0: ends with this connection
        if ender.connect(timeout):
            ender.disconnect()
            log.info("worker %s: retired (%d updates handed over)", user, handed - before)
        else:
            log.warning("worker %s: drained, but the broker did not let it in to end its session", user)
    return handed
