"""Processes of a federation on one machine: a program in its own process group, and mosquitto.

:class:`Process` runs one program in a process group of its own with its output appended to a log,
so that a SIGKILL reaches a daemon and its trainer child together, as a power cut would.
:class:`Mosquitto` runs mosquitto on a 127.0.0.1 port from a configuration that
``fednca_broker.mosquitto`` generated; :meth:`Mosquitto.for_coordinator` takes a federation
folder's settings, so whatever the coordinator's configuration says (port, TLS, accounts) is
what runs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from fednca.errors import FedNCAError

START_TIMEOUT = 10.0  # seconds for mosquitto to listen: a bound, not a measurement
STOP_TIMEOUT = 15.0  # seconds a party has to exit after SIGTERM before its group is killed


class HarnessError(FedNCAError):
    """A federation could not be set up or one of its parties failed."""


def mosquitto_binary() -> str | None:
    """The mosquitto executable (on PATH or where Debian puts it), or None when not installed."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------- processes


@dataclass
class Process:
    """One program run in a process group of its own, its output appended to ``log_path``."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    popen: subprocess.Popen[bytes] | None = None
    expect_exit: bool = False  # killed or stopped on purpose: its exit is no failure

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} is still running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env, start_new_session=True)
        self.expect_exit = False

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.popen.send_signal(sig)  # type: ignore[union-attr]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; the exit status (``subprocess.TimeoutExpired`` if it does not exit)."""
        self.expect_exit = True
        self.signal(signal.SIGTERM)
        return self.popen.wait(timeout) if self.popen is not None else 0

    def kill(self) -> None:
        """SIGKILL to the whole process group (a daemon with its trainer): a power cut."""
        self.expect_exit = True
        if self.popen is not None:
            killpg(self.popen.pid)
            self.popen.wait(STOP_TIMEOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def killpg(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the whole group has exited


def survivors(groups: set[int], *, settle_s: float = 5.0) -> list[str]:
    """Live (not zombie) processes in any of these process groups, after giving a SIGKILL just
    sent up to ``settle_s`` to take effect (its delivery is asynchronous: a dying process still
    shows as running for a moment)."""
    deadline = time.monotonic() + settle_s
    while (left := _live(groups)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _live(groups: set[int]) -> list[str]:
    left = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getpgid(p.pid) in groups and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.info['name']}")
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return left


class Mosquitto:
    """mosquitto on a 127.0.0.1 port, started from a configuration file that is already written."""

    def __init__(self, *, settings: Any, log_path: Path | None = None, binary: str | None = None) -> None:
        binary = binary or mosquitto_binary()
        if binary is None:
            raise HarnessError("mosquitto is not installed (apt-get install mosquitto)")
        self.settings = settings  # fednca_broker.mosquitto.MosquittoSettings
        self.process = Process(name="mosquitto", argv=[binary, "-c", str(settings.conf_path)],
                               log_path=log_path or Path(settings.folder) / "mosquitto.log")

    @classmethod
    def for_coordinator(cls, cfg: Any, *, log_path: Path | None = None, port: int | None = None) -> Mosquitto:
        """The mosquitto of a federation folder (its ``mosquitto/`` files, on its configured port,
        or on ``port``, behind a link that listens on the configured one). Run as root here,
        mosquitto is told to stay root (it would drop to a ``mosquitto`` user)."""
        from fednca_broker import mosquitto

        from fednca.atomic import write_text

        settings = cfg.mosquitto_settings()
        if os.geteuid() == 0:
            settings = dataclasses.replace(settings, run_as_root=True)
        if port is not None:
            settings = dataclasses.replace(settings, port=port)
        write_text(settings.conf_path, mosquitto.render_conf(settings), mode=0o640)
        return cls(settings=settings, log_path=log_path)

    @property
    def port(self) -> int:
        return int(self.settings.port)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def start(self) -> None:
        if listening(self.port):
            raise HarnessError(f"port {self.port} is taken: pick another")
        self.process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(self.port):
            if self.process.returncode() is not None:
                raise HarnessError(f"mosquitto exited at start; see {self.log_path}:\n{self.process.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise HarnessError(f"mosquitto did not listen within {START_TIMEOUT:.0f} s; see {self.log_path}")
            time.sleep(0.02)

    def stop(self) -> int | None:
        """SIGTERM: mosquitto saves its persistence file and exits (SIGKILL if it does not)."""
        if not self.process.running():
            return self.process.returncode()
        try:
            return self.process.stop(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.returncode()

    def kill(self) -> None:
        """SIGKILL: whatever was not yet saved is lost."""
        if self.process.running():
            self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """SIGHUP: mosquitto reads the password and ACL files again."""
        assert self.process.running(), "mosquitto is not running"
        self.process.signal(signal.SIGHUP)


