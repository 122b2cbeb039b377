"""Supervision of the trainer child: start it, hand it chunks, stop it, kill it when it hangs,
and turn what it says into lifecycle events.

The lifecycle decides *when* a trainer runs (:mod:`.lifecycle`); this module only carries out
those decisions on the one :class:`~fednca_daemon.workerproc.WorkerProcess` it holds, and keeps
the figures the telemetry reports (samples per second, peak memory, the trainers' pids). Its
messages arrive on a reader thread; the shell queues them as :class:`FromTrainer` and passes them
back to :meth:`TrainerSupervisor.on_event` on its own thread, so nothing here is shared between
threads but the queue.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

from . import lifecycle as lc
from .trainer_protocol import ChunkReport, DataSpec, TrainerEvent, TrainerReady, WorkerSpec
from .workerproc import WorkerProcess

log = logging.getLogger("fednca.daemon")

STOP_GRACE_S = 1.5  # a chunk asked to stop has this long before it is abandoned
EXIT_GRACE_S = 10.0  # an idle trainer asked to exit has this long


@dataclass(frozen=True)
class FromTrainer:
    """A trainer's message (``None``: it has exited), as the reader thread hands it over."""

    worker: WorkerProcess
    event: TrainerEvent | None


@dataclass(frozen=True)
class TrainerSetup:
    """What every trainer of this daemon shares; only the round differs between them."""

    state_dir: str
    federation: str
    coordinator_verify_key: str  # hex
    data: DataSpec
    threads: int
    low_memory: bool
    seed: int
    trainer: str = "numpy"

    def spec(self, round: int) -> WorkerSpec:
        return WorkerSpec(state_dir=self.state_dir, round=round, federation=self.federation,
                          coordinator_verify_key=self.coordinator_verify_key, data=self.data,
                          threads=self.threads, low_memory=self.low_memory, seed=self.seed,
                          trainer=self.trainer)


class TrainerSupervisor:
    """At most one trainer child at a time, for the round the lifecycle named."""

    def __init__(self, *, setup: TrainerSetup, deliver: Callable[[FromTrainer], None],
                 follow: Callable[[int | None], None], python: str = sys.executable,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.setup = setup
        self._deliver = deliver  # called on the reader thread: must only queue
        self._follow = follow  # told the trainer's pid (or None) so the sensors count its CPU
        self._python = python
        self._monotonic = monotonic
        self._worker: WorkerProcess | None = None
        self._stop_asked = False
        self.kill_at: float | None = None
        self._chunk_started = 0.0
        self.samples_per_s: float | None = None
        self.chunk_s: float | None = None
        self.samples_trained = 0
        self.peak_rss = 0
        self.pids: list[int] = []
        self._last_error: str | None = None  # the failure last logged, so a repeat is not

    @property
    def pid(self) -> int | None:
        return None if self._worker is None else self._worker.pid

    def start(self, round: int) -> None:
        self._worker = WorkerProcess(spec=self.setup.spec(round), python=self._python,
                                     listener=lambda w, e: self._deliver(FromTrainer(w, e)))
        self._stop_asked = False
        self.kill_at = None
        try:
            self._worker.start()
        except OSError:  # no memory or processes left: the shell reports it, the lifecycle backs off
            self._worker = None
            raise
        assert self._worker.pid is not None
        self.pids.append(self._worker.pid)
        self._follow(self._worker.pid)
        log.info("trainer %d started for round %d", self._worker.pid, round)

    def run_chunk(self, seconds: float) -> None:
        assert self._worker is not None
        self._chunk_started = self._monotonic()
        self._worker.run_chunk(seconds)

    def stop(self, *, interrupt: bool) -> None:
        """Interrupt a running chunk (SIGTERM) or let an idle trainer exit (end of its input);
        either way it is killed if it has not exited in time (see :meth:`check`)."""
        if self._worker is None:
            return
        self._stop_asked = True
        if interrupt:
            self._worker.interrupt()
        else:
            self._worker.close_input()
        self.kill_at = self._monotonic() + (STOP_GRACE_S if interrupt else EXIT_GRACE_S)

    def check(self, now: float) -> None:
        """Kill a trainer that did not stop in time (its last checkpoint stays)."""
        if self.kill_at is not None and now >= self.kill_at and self._worker is not None:
            log.warning("trainer %s did not stop in time: killed (its last checkpoint stays)", self._worker.pid)
            self._worker.kill()
            self.kill_at = None

    def kill_if_running(self) -> None:
        if self._worker is not None and self._worker.returncode is None:
            self._worker.kill()

    def on_event(self, item: FromTrainer) -> lc.Event | None:
        """The lifecycle event for a trainer's message; None for a trainer no longer followed."""
        worker, event = item.worker, item.event
        if worker is not self._worker:
            return None
        self.peak_rss = max(self.peak_rss, worker.peak_rss)
        now = self._monotonic()
        if event is None:
            error = None if self._stop_asked else worker.error
            if error and error != self._last_error:
                log.error("trainer %s failed: %s", worker.pid, error)
            elif error:  # the same failure again, after a back-off: said once is enough
                log.debug("trainer %s failed again: %s", worker.pid, error)
            self._last_error = error
            self._worker, self.kill_at = None, None
            self._follow(None)
            return lc.WorkerExited(error)
        if isinstance(event, TrainerReady):
            log.info("trainer %s ready: round %d, step %d of %d", worker.pid, event.round, event.steps,
                     event.planned)
            return lc.WorkerReady(event.round, event.steps, event.planned, event.cpu_s, now - worker.started_at)
        if isinstance(event, ChunkReport):
            wall = now - self._chunk_started
            self.samples_trained += event.chunk_samples
            if event.chunk_samples:
                self.samples_per_s, self.chunk_s = event.chunk_samples / max(wall, 1e-9), wall
            log.debug("chunk: %d steps in %.2f s, step %d of %d", event.chunk_steps, wall, event.steps,
                      event.planned)
            return lc.ChunkDone(event.round, event.steps, event.planned, event.cpu_s, wall)
        return None  # TrainerFailed: its message becomes the error of the exit that follows
