"""The trainer child process as the daemon sees it: start it, talk to it, stop it.

The daemon itself never imports PyTorch. For each round that needs work it starts
``python -m fednca_daemon.worker``, which loads the data, resumes from the checkpoint, trains
one chunk per command and exits when told (or when the daemon dies: it asks the kernel for
SIGKILL on its parent's death). Its memory is returned to the system when it exits.

Both directions carry the typed messages of :mod:`.trainer_protocol`, one JSON object per line;
nothing is pickled.

Signals: SIGTERM (or SIGINT) ends a running chunk after its current optimiser step; the trainer
checkpoints, reports the chunk and exits 0. A trainer that does not answer in time is killed:
the previous chunk's checkpoint stays valid, so at most that one chunk is lost.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from .errors import TrainerProtocolError
from .trainer_protocol import (MAX_LINE, ChunkCommand, TrainerEvent, TrainerFailed, WorkerSpec, decode_event,
                               encode_command)

log = logging.getLogger("fednca.daemon")

_STRIPPED_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def child_env(threads: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The trainer's environment: no systemd notification socket (only the daemon notifies)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _STRIPPED_ENV}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


Listener = Callable[["WorkerProcess", "TrainerEvent | None"], None]


class WorkerProcess:
    """One trainer child. ``listener(worker, message)`` is called from a reader thread for every
    message, and once with ``None`` when the child has exited (``returncode`` and ``error`` set)."""

    def __init__(self, *, spec: WorkerSpec, listener: Listener, python: str = sys.executable) -> None:
        self.spec = spec
        self._listener = listener
        self._python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.started_at = 0.0
        self.error: str | None = None
        self.peak_rss = 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [self._python, "-m", "fednca_daemon.worker", "--events-fd", str(write_fd),
                 "--log-level", str(log.getEffectiveLevel())],
                stdin=subprocess.PIPE,
                pass_fds=(write_fd,),
                env=child_env(self.spec.threads),
                close_fds=True,
            )
        finally:
            os.close(write_fd)
        self.started_at = time.monotonic()
        self._send(self.spec.to_json().encode() + b"\n")
        reader = threading.Thread(target=self._read, args=(read_fd,), name=f"trainer-{self._proc.pid}", daemon=True)
        reader.start()

    def run_chunk(self, seconds: float) -> None:
        self._send(encode_command(ChunkCommand(seconds=float(seconds))))

    def close_input(self) -> None:
        """Ask an idle trainer to exit (end of its input)."""
        with self._lock:
            if self._proc is not None and self._proc.stdin is not None and not self._proc.stdin.closed:
                try:
                    self._proc.stdin.close()
                except BrokenPipeError:
                    pass

    def interrupt(self) -> None:
        """SIGTERM: end the running chunk after its current step, checkpoint and exit."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: abandon the running chunk; the previous checkpoint stays."""
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _send(self, data: bytes) -> None:
        with self._lock:
            stdin = None if self._proc is None else self._proc.stdin
            if stdin is None or stdin.closed:
                return
            try:
                stdin.write(data)
                stdin.flush()
            except BrokenPipeError:
                pass  # it has exited; the reader reports that

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as events:
            for line in events:
                if len(line) > MAX_LINE:
                    log.error("trainer %s sent an over-long line; ignored", self.pid)
                    continue
                try:
                    event = decode_event(line)
                except TrainerProtocolError as e:
                    log.error("%s", e)
                    continue
                self.peak_rss = max(self.peak_rss, event.peak_rss)
                if isinstance(event, TrainerFailed):
                    self.error = event.message or "unknown error"
                self._listener(self, event)
        assert self._proc is not None
        code = self._proc.wait()
        self.close_input()
        if code != 0 and self.error is None:
            self.error = f"trainer exited with status {code}" if code > 0 else f"trainer killed by signal {-code}"
        self._listener(self, None)
