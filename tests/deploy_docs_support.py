"""Running the operator's documented commands on one machine, changing only what it cannot have.

docs/operations.md gives every step as ``sh`` blocks for a real hub and real boards. A test machine
has one host, no ``/etc/fednca`` of its own to write, no systemd and no ``fednca`` user, so each
:class:`Host` (the hub, each site) gets a scratch root and :meth:`Host.localize` rewrites a command
only there: the system folders move below the root, the hub's names become ``localhost``,
``127.0.0.1`` and a free port, ``tar -C /`` works in the root instead, the guide's example values
(:attr:`Host.examples`: the round to go back to, the backup's date) become this run's, ``sudo``
goes (the tests run as root), ``make install-*`` and the
install scripts install below the root without a venv, and ``-o fednca -g fednca`` is dropped where
that user does not exist; ``FEDNCA_STATE_DIR`` tells ``fednca segment`` where this host's
``/var/lib/fednca`` is. ``systemctl start/stop/restart/reload UNIT`` starts, stops or HUPs the
program that the unit file's ``ExecStart`` names (localized the same way); ``journalctl`` is only
watching and is skipped. Everything else runs as written in ``sh -e``.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fednca_app.harness import Process, listening
from mosquitto_fixture import MOSQUITTO

REPO = Path(__file__).resolve().parent.parent
FEDNCA = str(Path(sys.executable).with_name("fednca"))
SYSTEM_DIRS = re.compile(r"(?<![\w./-])/(var/lib|etc|root|srv)(?=/)")
UNITS = {  # unit -> the file whose ExecStart runs it
    "mosquitto": REPO / "systemd" / "mosquitto-fednca.conf",
    "fednca-coordinator": REPO / "systemd" / "fednca-coordinator.service",
    "fednca-daemon": REPO / "systemd" / "fednca-daemon.service",
}
START_WAIT = 15.0  # seconds for mosquitto to listen: a bound, not a measurement


def sh_blocks(markdown: str) -> dict[str, list[list[str]]]:
    """Each ``##`` section's ```sh blocks, each a list of commands (continuations joined, trailing
    comments dropped)."""
    sections: dict[str, list[list[str]]] = {}
    heading = ""
    for part in re.split(r"^(## .*)$", markdown, flags=re.MULTILINE):
        if part.startswith("## "):
            heading = part[3:].strip()
            continue
        for block in re.findall(r"^```sh\n(.*?)^```", part, flags=re.MULTILINE | re.DOTALL):
            joined = re.sub(r"\\\n\s*", "", block)
            commands = [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
            sections.setdefault(heading, []).append([c for c in commands if c])
    return sections


def readme_commands(readme: str, section: str = "Deploying") -> list[str]:
    """The commands of the README section's ```sh blocks, ``sudo`` dropped, ``&&`` split."""
    body = re.split(r"^## ", readme.split(f"## {section}\n", 1)[1], flags=re.MULTILINE)[0]
    dedented = "\n".join(line.strip() for line in body.splitlines())
    out = []
    for commands in sh_blocks(f"## {section}\n{dedented}").get(section, []):
        for command in commands:
            out += [c.strip().removeprefix("sudo ") for c in command.split("&&")]
    return out


def user_exists(name: str) -> bool:
    return subprocess.run(["getent", "passwd", name], capture_output=True).returncode == 0


@dataclass
class Host:
    """One machine of the documented deployment, below its own scratch root."""

    name: str
    root: Path
    port: int
    site: str = "clinic-a"  # the docs' site id, replaced by this one
    processes: dict[str, Process] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)  # the documented commands, as written, that ran here
    examples: dict[str, str] = field(default_factory=dict)  # a documented example value -> this run's

    def __post_init__(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # mosquitto, as its own user, must pass through to the broker's files

    @property
    def home(self) -> Path:
        return self.root / "root"

    def path(self, documented: str) -> Path:
        """Where a documented absolute path lies on this host."""
        return Path(self.localize(documented))

    def localize(self, command: str) -> str:
        c = command
        for documented, value in self.examples.items():
            c = c.replace(documented, value)
        c = c.replace("/opt/fednca/venv/bin/fednca", FEDNCA)
        c = SYSTEM_DIRS.sub(lambda m: f"{self.root}/{m.group(1)}", c)
        c = re.sub(r"(?<=\btar -C )/(?=\s)", f"{self.root}/", c)  # archives name paths relative to /
        c = c.replace("0.0.0.0:8883", f"127.0.0.1:{self.port}").replace(":8883", f":{self.port}")
        c = c.replace("clinic-hub.example", "localhost").replace("10.0.0.5", "127.0.0.1")
        c = c.replace("clinic-a", self.site)
        if not user_exists("fednca"):
            c = c.replace(" -o fednca -g fednca", "")
        c = re.sub(r"^make install-coordinator(?: ARGS=(\S+))?",
                   lambda m: f"SKIP_VENV=1 {REPO}/systemd/install-coordinator.sh --source {REPO} --root {self.root}"
                             + (f" {m.group(1)}" if m.group(1) else ""), c)  # fmt: skip
        c = re.sub(r"^systemd/install-daemon\.sh",
                   f"DESTDIR={self.root} SKIP_USER=1 SKIP_VENV=1 SKIP_SYSTEMCTL=1 FEDNCA={FEDNCA} "
                   f"{REPO}/systemd/install-daemon.sh", c)  # fmt: skip
        return c

    def run(self, commands: list[str], *, editor: Callable[[Path], None] | None = None) -> list[str]:
        """Run documented commands here; the output of each that ran in a shell. ``editor`` makes
        the change an operator makes by hand at ``editor FILE``."""
        outputs = []
        for documented in commands:
            command = documented.removeprefix("sudo ")
            self.ran.append(command)
            words = shlex.split(command)
            if words[0] == "journalctl":
                continue
            if words[0] == "systemctl":
                for unit in words[2:]:
                    self.systemctl(words[1], unit)
                continue
            if words[0] == "editor":
                assert editor is not None, f"{self.name}: nothing to write for {command!r}"
                editor(self.path(words[1]))
                continue
            local = self.localize(command)
            env = dict(os.environ, PATH=f"{Path(FEDNCA).parent}:{os.environ['PATH']}",
                       FEDNCA_STATE_DIR=str(self.path("/var/lib/fednca")))  # segment's default model is below it
            done = subprocess.run(["sh", "-ec", local], cwd=self.home, env=env, capture_output=True, text=True,
                                  timeout=300)  # fmt: skip
            assert done.returncode == 0, f"{self.name}: {local!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            outputs.append(done.stdout + done.stderr)
        return outputs

    # -- systemctl -----------------------------------------------------------------------------------

    def exec_start(self, unit: str) -> list[str]:
        text = UNITS[unit].read_text()
        line = [v for v in re.findall(r"^ExecStart=(.*)$", text, flags=re.MULTILINE) if v.strip()][-1]
        argv = shlex.split(self.localize(line))
        if unit == "mosquitto":
            argv[0] = MOSQUITTO or argv[0]  # where this machine has it
        return argv

    def systemctl(self, verb: str, unit: str) -> None:
        unit = unit.removesuffix(".service")
        if verb == "restart":
            self.systemctl("stop", unit)
            verb = "start"
        process = self.processes.get(unit)
        if verb == "stop":
            if process is not None and process.running():
                assert process.stop() in (0, -signal.SIGTERM), f"{self.name} {unit} failed:\n{process.log()[-3000:]}"
        elif verb == "reload":
            assert process is not None and process.running(), f"{self.name}: {unit} is not running"
            process.signal(signal.SIGHUP)
        elif verb == "start":
            if process is not None and process.running():
                return
            process = Process(name=unit, argv=self.exec_start(unit), log_path=self.root / "log" / f"{unit}.log",
                              env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")})
            process.start()
            self.processes[unit] = process
            if unit == "mosquitto":
                deadline = time.monotonic() + START_WAIT
                while not listening(self.port):
                    assert process.running(), f"mosquitto exited:\n{process.log()}"
                    assert time.monotonic() < deadline, f"mosquitto does not listen:\n{process.log()}"
                    time.sleep(0.05)
        else:
            raise AssertionError(f"systemctl {verb} is not one the docs may use here")

    def log(self, unit: str) -> str:
        return self.processes[unit].log() if unit in self.processes else ""

    def close(self) -> None:
        for process in self.processes.values():
            if process.running():
                try:
                    process.stop(10)
                except subprocess.TimeoutExpired:
                    process.kill()
