"""The trainer child process: ``python -m fednca_daemon.worker --events-fd N`` (see workerproc).

It reads its :class:`~fednca_daemon.trainer_protocol.WorkerSpec` from the first line of input, then:

1. takes ``worker.lock`` in the state folder (one trainer per folder, ever);
2. verifies ``announcement.bin`` again, now against the announced model's own tensor shapes;
3. loads the site's images at the model's input size (holding out ``test_fraction``);
4. resumes: a checkpoint of this round continues where it stopped; a checkpoint of an earlier
   round keeps its Adam moments, RNG and data cursor and takes the new global weights
   (:meth:`Trainer.set_weights`); no usable checkpoint starts from the global weights;
5. answers ``ready`` and then trains one chunk per command, at most up to the planned steps,
   writing the checkpoint atomically after each, and answers ``chunk``.

The trainer is the spec's ``trainer`` (``training.trainer`` in daemon.yaml): ``numpy``
(:mod:`fednca.nptrain`, the default, which never imports PyTorch) or ``torch`` (:mod:`fednca.train`,
the reference, which needs the ``torch`` extra). This is the only place in the daemon that may
import PyTorch, and only for the latter. Each trainer refuses the other's checkpoint: a site that
switches trainer starts its current round again from the global model, with fresh Adam moments
(a warning names the file and the trainer that wrote it).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import logging
import math
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from fednca.atomic import write_bytes
from fednca.errors import FedNCAError

from .held_model import held_models
from .outbox import StateFolder
from .errors import TrainerError, TrainerProtocolError
from .trainer_protocol import (ChunkCommand, ChunkReport, TrainerEvent, TrainerFailed, TrainerReady, WorkerSpec,
                               decode_command, encode_event)

log = logging.getLogger("fednca.daemon.worker")
PR_SET_PDEATHSIG = 1
LOCK_WAIT_S = 30.0
_STOP_OFFSET = 1e9  # added to the chunk clock once a stop is asked: the chunk ends after its step


class _Stop(Exception):
    """Raised by the signal handler while the trainer waits between chunks."""


class _Signals:
    def __init__(self) -> None:
        self.stop = False
        self.busy = False

    def handler(self, signum: int, frame: Any) -> None:
        self.stop = True
        if not self.busy:
            raise _Stop

    def clock(self) -> float:
        return time.monotonic() + (_STOP_OFFSET if self.stop else 0.0)


def _die_with_parent() -> None:
    """Ask Linux for SIGKILL when the daemon dies, so no orphan trainer writes a checkpoint."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot ask to die with the daemon (prctl unavailable)")
    if os.getppid() != parent:
        os._exit(1)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                raise TrainerError(f"{path}: another trainer holds the lock") from None
            time.sleep(0.05)


def _load_data(spec: WorkerSpec, size: int) -> tuple[Any, Any]:
    from fednca.data import load_folder, split

    d = spec.data
    if d.folder is not None:
        data, skipped = load_folder(d.folder, size=size, skip_bad=d.skip_bad)
        if skipped:
            log.warning("skipped %d unreadable image/mask pair(s) in %s", skipped, d.folder)
    else:
        from fednca.phantom import phantom_dataset

        p = d.phantom
        assert p is not None  # DataSpec holds exactly one of the two
        data = phantom_dataset(site=p.site, count=p.count, size=size, seed=p.seed)
    fraction = d.test_fraction
    if fraction > 0 and len(data) >= 2:
        return split(data, test_fraction=fraction, seed=spec.seed)
    return data, None


@dataclass(frozen=True)
class Backend:
    """One trainer implementation behind the interface the session uses."""

    name: str
    trainer: Any  # the Trainer class: constructor, restore(), run(), checkpoint(), set_weights()
    evaluate: Callable[[Any, Any], float]  # (trainer, dataset) -> mean Dice on that dataset
    check: Callable[[Any], None]  # raises TrainerError when it cannot train this model configuration


def _numpy_backend(threads: int) -> Backend:
    from fednca import npnca
    from fednca.errors import ConfigError
    from fednca.nptrain import Trainer, evaluate

    def check(cfg: Any) -> None:
        try:
            npnca.check_supported(cfg)
        except ConfigError as e:
            raise TrainerError(f"the numpy trainer cannot train this federation's model ({e}); "
                               "set training.trainer: torch on this site (needs PyTorch)") from None

    # numpy's BLAS takes its threads from OPENBLAS_NUM_THREADS and friends (set by the daemon).
    return Backend(name="numpy", trainer=Trainer, check=check,
                   evaluate=lambda t, data: evaluate(t.params, t.model_cfg, data).dice_mean)


def _torch_backend(threads: int) -> Backend:
    try:
        import torch
    except ImportError:
        raise TrainerError("training.trainer is 'torch' but PyTorch is not installed here: install the "
                           "package's [torch] extra, or set training.trainer: numpy") from None
    from fednca.train import Trainer, evaluate

    torch.set_num_threads(threads)
    return Backend(name="torch", trainer=Trainer, check=lambda cfg: None,
                   evaluate=lambda t, data: evaluate(t.model, data).dice_mean)


BACKENDS = {"numpy": _numpy_backend, "torch": _torch_backend}


class Session:
    """The trainer of one round, after start-up."""

    def __init__(self, *, spec: WorkerSpec, events: BinaryIO, signals: _Signals) -> None:
        import numpy as np

        from fednca.training import CheckpointError
        from fednca.wire import open_announcement
        from nacl.signing import VerifyKey

        backend = BACKENDS[spec.trainer](spec.threads)
        Trainer, evaluate = backend.trainer, backend.evaluate
        self.spec, self.events, self.signals = spec, events, signals
        self.evaluate = evaluate
        folder = StateFolder(path=spec.state_dir)
        self.checkpoint_path = folder.checkpoint_path
        ann = open_announcement(folder.announcement_path.read_bytes(),
                                coordinator_verify_key=VerifyKey(bytes.fromhex(spec.coordinator_verify_key)),
                                federation=spec.federation, held=held_models(folder))  # a delta's base
        h = ann.header
        if h.round != spec.round:
            raise TrainerError(f"the saved announcement is for round {h.round}, not {spec.round}")
        backend.check(h.model)
        self.train, self.test = _load_data(spec, h.model.input_size)
        trainer, extra = None, {}
        if self.checkpoint_path.exists():
            try:
                trainer, extra = Trainer.restore(self.checkpoint_path.read_bytes(), data=self.train)
            except CheckpointError as e:
                log.warning("%s: checkpoint not usable by the %s trainer (%s): starting the round from the "
                            "global model", self.checkpoint_path, backend.name, e)
            if trainer is not None and (trainer.model_cfg != h.model or trainer.train_cfg != h.train):
                log.warning("the federation changed the model or training configuration: new optimiser state")
                trainer, extra = None, {}
        if trainer is not None and extra.get("round") == h.round and extra.get("base_sha256") == h.model_sha256:
            trainer.low_memory = spec.low_memory
            log.info("resuming round %d at step %d of %d", h.round, trainer.steps - extra["round_start"],
                     extra["planned"])
        else:
            global_weights = {k: np.array(v) for k, v in ann.tensors.items()}  # writable copies
            if trainer is None:
                trainer = Trainer(model_cfg=h.model, train_cfg=h.train, data=self.train, seed=spec.seed,
                                  low_memory=spec.low_memory, weights=global_weights)
            else:
                trainer.low_memory = spec.low_memory
                trainer.set_weights(global_weights)  # Adam moments stay
            extra = {"round": h.round, "base_sha256": h.model_sha256, "round_start": trainer.steps,
                     "planned": h.train.local_epochs * trainer.batches_per_epoch, "loss_sum": 0.0, "loss_steps": 0}
            if self.test is not None:
                extra["dice_global"] = evaluate(trainer, self.test)
            self.save(trainer, extra)
            log.info("round %d: %d steps planned on %d images", h.round, extra["planned"], len(self.train))
        self.trainer, self.extra = trainer, extra

    @property
    def steps(self) -> int:
        return self.trainer.steps - int(self.extra["round_start"])

    @property
    def planned(self) -> int:
        return int(self.extra["planned"])

    def save(self, trainer: Any, extra: dict[str, Any]) -> None:
        write_bytes(self.checkpoint_path, trainer.checkpoint(**extra), mode=0o600)

    def send(self, event: TrainerEvent) -> None:
        self.events.write(encode_event(event))
        self.events.flush()

    def ready(self, cpu_s: float) -> TrainerReady:
        return TrainerReady(round=self.spec.round, steps=self.steps, planned=self.planned, samples=len(self.train),
                            cpu_s=cpu_s, peak_rss=_peak_rss())

    def chunk(self, seconds: float) -> None:
        cpu0 = time.process_time()
        left = self.planned - self.steps
        steps = samples = 0
        loss = float("nan")
        if left > 0 and not self.signals.stop:
            c = self.trainer.run(max_steps=left, max_seconds=seconds, clock=self.signals.clock)
            steps, samples, loss = c.steps, c.samples, c.loss
            self.extra["loss_sum"] += c.loss * c.steps
            self.extra["loss_steps"] += c.steps
            if self.steps >= self.planned and self.test is not None:
                self.extra["dice_local"] = self.evaluate(self.trainer, self.test)
            self.save(self.trainer, self.extra)
        self.send(ChunkReport(round=self.spec.round, steps=self.steps, planned=self.planned,
                              samples=len(self.train), chunk_steps=steps, chunk_samples=samples,
                              loss=loss if steps and math.isfinite(loss) else None,
                              cpu_s=time.process_time() - cpu0, stopped=self.signals.stop, peak_rss=_peak_rss()))


def serve(spec: WorkerSpec, commands: BinaryIO, events: BinaryIO, signals: _Signals) -> int:
    # A stop during start-up ends the process at once: an interrupted checkpoint write leaves
    # the previous file whole, and the next trainer simply starts the round again.
    session = Session(spec=spec, events=events, signals=signals)
    session.send(session.ready(cpu_s=time.process_time()))
    if signals.stop:
        return 0
    for line in commands:
        cmd = _command(line)
        signals.busy = True
        session.chunk(cmd.seconds)
        signals.busy = False
        if signals.stop:
            break
    return 0


def _command(line: bytes) -> ChunkCommand:
    try:
        return decode_command(line)
    except TrainerProtocolError:
        raise TrainerProtocolError(f"unknown command from the daemon: {line[:80]!r}") from None


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fednca_daemon.worker")
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO, help="the daemon's own level")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="trainer[%(process)d] %(levelname)s %(message)s")
    _die_with_parent()
    signals = _Signals()
    signal.signal(signal.SIGTERM, signals.handler)
    signal.signal(signal.SIGINT, signals.handler)
    events = os.fdopen(args.events_fd, "wb", buffering=0)
    commands = sys.stdin.buffer
    lock_fd = None
    try:
        spec = WorkerSpec.from_json(commands.readline().decode())
        lock_fd = _lock(StateFolder(path=spec.state_dir).worker_lock_path)
        return serve(spec, commands, events, signals)
    except _Stop:
        return 0
    except FedNCAError as e:
        log.error("%s", e)
        events.write(encode_event(TrainerFailed(message=str(e), peak_rss=_peak_rss())))
        return 2
    except OSError as e:  # the device, not a bug: a full disk, an unwritable state folder, a lost file
        where = f" ({e.filename})" if e.filename else ""
        log.error("training stopped by a file system error%s: %s", where, e.strerror or e)
        events.write(encode_event(TrainerFailed(message=f"file system error{where}: {e.strerror or e}",
                                                peak_rss=_peak_rss())))  # fmt: skip
        return 2
    except Exception as e:  # a bug: say so on the pipe, keep the traceback for the journal
        traceback.print_exc()
        events.write(encode_event(TrainerFailed(message=f"internal error: {type(e).__name__}: {e}", peak_rss=_peak_rss())))
        return 1
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the checkpoint is on disk: skip the interpreter's (and PyTorch's) slow teardown
