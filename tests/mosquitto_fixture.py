"""A real mosquitto for integration tests, configured by broker/mosquitto.py under tmp_path.

``mosquitto_factory(federation=..., sites=...)`` starts one on a free 127.0.0.1 port (in the
foreground, as a child process) and stops it at teardown; ``mosquitto`` is one with the defaults.
``restart()`` stops it cleanly (persistence saved) and starts it again on the same port;
``kill()`` is SIGKILL. Tests are skipped only where the mosquitto binary is absent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from fednca_broker.mosquitto import MosquittoSettings, write_files

MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
)
START_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningMosquitto:
    def __init__(self, *, settings: MosquittoSettings, passwords: dict[str, str]) -> None:
        self.settings = settings
        self.passwords = passwords
        self.log_path = Path(settings.folder) / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.settings.port}"

    @property
    def federation(self) -> str:
        return self.settings.federation

    def start(self) -> None:
        assert self._process is None, "already running"
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.settings.conf_path)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited at start:\n{self.log_path.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.settings.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen within {START_TIMEOUT} s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def kill(self) -> None:
        """SIGKILL: whatever was not yet saved is lost."""
        if self._process is not None:
            self._process.send_signal(signal.SIGKILL)
            self._process.wait(timeout=10)
            self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto reads the password and ACL files again."""
        assert self._process is not None
        self._process.send_signal(signal.SIGHUP)


@pytest.fixture
def mosquitto_factory(tmp_path):
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed")
    started: list[RunningMosquitto] = []

    def make(
        *, federation: str = "fed", sites: tuple[str, ...] = ("site-a", "site-b"), **settings
    ) -> RunningMosquitto:
        folder = tmp_path / f"mosquitto-{len(started)}"
        config = MosquittoSettings(
            federation=federation,
            folder=str(folder),
            port=free_port(),
            run_as_root=os.geteuid() == 0,
            **settings,
        )
        passwords = {config.coordinator_user: "coordinator-secret"}
        passwords.update({site: f"{site}-secret" for site in sites})
        write_files(
            config,
            coordinator_password=passwords[config.coordinator_user],
            site_passwords={site: passwords[site] for site in sites},
        )
        broker = RunningMosquitto(settings=config, passwords=passwords)
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def mosquitto(mosquitto_factory) -> RunningMosquitto:
    return mosquitto_factory()
