"""The outbox and the rest of the daemon's state folder.

Layout of the state folder (``/var/lib/fednca``, mode 0700, every file 0600)::

    daemon.lock                 held (flock) by the running daemon: one daemon per folder
    worker.lock                 held by the running trainer: one trainer per folder
    announcement.bin            the newest verified round announcement, as it came
    announcement.json           when its round ends by this device's clock (see docs/wire.md)
    checkpoint.safetensors      the trainer's checkpoint (model, Adam moments, RNG, data cursor, round)
    done.json                   the newest round whose work is over, and how it ended
    outbox/r<round>-<update id>.update   sealed updates waiting for their receipt

Every file is written with :func:`fednca.atomic.write_bytes` (or the writer passed in, for tests
of a full disk); a temporary file left by a write that was interrupted is deleted when the folder
is opened. An update is stored here before it is published, so whatever happens after that, it
is published again until its receipt arrives. A file found damaged is never deleted: it is
renamed ``<name>.corrupt`` (:meth:`StateFolder.move_aside`) for whoever wants to look at it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fednca.atomic import fsync_dir, remove_temporaries, write_bytes
from .errors import DamagedFile, StateFolderError

Writer = Callable[..., None]  # write_bytes(path, data, *, mode)

_ENTRY = re.compile(r"r(\d{1,10})-([0-9a-f]{32})\.update")
_MAX_UPDATE = 64 << 20
DONE_FORMAT = 1
TIMING_FORMAT = 1
MAX_ASIDE = 9  # damaged copies kept of one file; the oldest is replaced after that


class Outbox:
    """Sealed updates waiting for a receipt, one file each, named by round and update id."""

    def __init__(self, *, folder: str | os.PathLike, writer: Writer = write_bytes) -> None:
        self.folder = Path(folder)
        self._write = writer

    def open(self) -> None:
        _make_private_dir(self.folder)
        remove_temporaries(self.folder)

    def path(self, round: int, update_id: str) -> Path:
        name = f"r{round}-{update_id}.update"
        if not _ENTRY.fullmatch(name):
            raise StateFolderError(f"not an outbox entry: round {round!r}, update id {update_id!r}")
        return self.folder / name

    def put(self, round: int, update_id: str, payload: bytes) -> Path:
        path = self.path(round, update_id)
        self._write(path, payload, mode=0o600)
        return path

    def get(self, round: int, update_id: str) -> bytes:
        path = self.path(round, update_id)
        try:
            with open(path, "rb") as f:
                data = f.read(_MAX_UPDATE + 1)
        except OSError as e:
            raise StateFolderError(f"{path}: cannot read ({e.strerror})") from None
        if len(data) > _MAX_UPDATE or not data:  # sealed: nothing more can be checked here
            raise DamagedFile(path, f"{path}: empty or larger than {_MAX_UPDATE} bytes")
        return data

    def remove(self, round: int, update_id: str) -> bool:
        try:
            os.unlink(self.path(round, update_id))
        except FileNotFoundError:
            return False
        fsync_dir(self.folder)
        return True

    def entries(self) -> list[tuple[int, str]]:
        """(round, update id) of every stored update, oldest round first."""
        if not self.folder.is_dir():
            return []
        found = []
        for name in os.listdir(self.folder):
            m = _ENTRY.fullmatch(name)
            if m:
                found.append((int(m.group(1)), m.group(2)))
        return sorted(found)

    def __len__(self) -> int:
        return len(self.entries())


@dataclass(frozen=True)
class Timing:
    """When the announced round ends by this device's clock: its deadline as the daemon measured
    it (receipt time plus the announcement's ``seconds_left``), so a restart keeps it."""

    round: int
    model_sha256: str
    deadline: float


@dataclass(frozen=True)
class Done:
    round: int = -1  # the newest round whose work is over
    result: str = ""  # "accepted" or the receipt's reason code


class StateFolder:
    """The daemon's state folder; ``open`` makes it (0700), locks it and cleans up."""

    def __init__(self, *, path: str | os.PathLike, writer: Writer = write_bytes) -> None:
        self.path = Path(path)
        self._write = writer
        self.outbox = Outbox(folder=self.path / "outbox", writer=writer)
        self._lock_fd: int | None = None

    @property
    def announcement_path(self) -> Path:
        return self.path / "announcement.bin"

    @property
    def timing_path(self) -> Path:
        return self.path / "announcement.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.safetensors"

    @property
    def done_path(self) -> Path:
        return self.path / "done.json"

    @property
    def worker_lock_path(self) -> Path:
        return self.path / "worker.lock"

    def open(self) -> None:
        _make_private_dir(self.path)
        fd = os.open(self.path / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StateFolderError(f"{self.path}: another daemon is using this state folder") from None
            raise
        self._lock_fd = fd
        remove_temporaries(self.path)
        self.outbox.open()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def read(self, path: Path, *, limit: int = _MAX_UPDATE) -> bytes | None:
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateFolderError(f"{path}: cannot read ({e.strerror})") from None
        if len(data) > limit:
            raise StateFolderError(f"{path}: larger than {limit} bytes")
        return data

    def load_announcement(self) -> bytes | None:
        return self.read(self.announcement_path)

    def save_announcement(self, payload: bytes) -> None:
        self._write(self.announcement_path, payload, mode=0o600)

    def write_file(self, path: Path, data: bytes) -> None:
        """Write another state file of this folder atomically (0600), as the files above."""
        self._write(path, data, mode=0o600)

    def load_timing(self) -> Timing | None:
        """The saved timing; None when there is none or it is damaged (the caller falls back)."""
        raw = self.read(self.timing_path, limit=4096)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if data.get("format") != TIMING_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            t = Timing(round=data["round"], model_sha256=data["model_sha256"], deadline=data["deadline"])
            if (type(t.round) is not int or not isinstance(t.model_sha256, str)
                    or type(t.deadline) not in (int, float) or not math.isfinite(t.deadline)):
                raise ValueError("round, model_sha256 or deadline of the wrong type")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedFile(self.timing_path, f"{self.timing_path}: damaged ({e})") from None
        return t

    def save_timing(self, timing: Timing) -> None:
        body = {"format": TIMING_FORMAT, "round": timing.round, "model_sha256": timing.model_sha256,
                "deadline": timing.deadline}
        self._write(self.timing_path, json.dumps(body).encode() + b"\n", mode=0o600)

    def load_checkpoint(self) -> bytes | None:
        return self.read(self.checkpoint_path)

    def load_done(self) -> Done:
        raw = self.read(self.done_path, limit=4096)
        if raw is None:
            return Done()
        try:
            data = json.loads(raw)
            if data.get("format") != DONE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            done = Done(round=data["round"], result=data["result"])
            if not isinstance(done.round, int) or isinstance(done.round, bool) or not isinstance(done.result, str):
                raise ValueError("round must be an integer and result a string")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DamagedFile(self.done_path, f"{self.done_path}: damaged ({e})") from None
        return done

    def save_done(self, done: Done) -> None:
        body = {"format": DONE_FORMAT, "round": done.round, "result": done.result}
        self._write(self.done_path, json.dumps(body).encode() + b"\n", mode=0o600)

    def move_aside(self, path: str | os.PathLike) -> Path:
        """Rename a damaged file to ``<name>.corrupt`` (``.corrupt-2`` ... when one is there
        already) and return the new path; nothing is deleted but the oldest of too many copies."""
        path = Path(path)
        names = [path.with_name(f"{path.name}.corrupt")] + [
            path.with_name(f"{path.name}.corrupt-{n}") for n in range(2, MAX_ASIDE + 1)]
        target = next((n for n in names if not n.exists()), names[-1])
        os.replace(path, target)
        fsync_dir(path.parent)
        return target


def _make_private_dir(folder: Path) -> None:
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    elif not folder.is_dir():
        raise StateFolderError(f"{folder}: exists and is not a folder")
