"""The coordinator's durable files for one federation: round state, accepted updates, log, models.

Layout (the folder is 0700 and every file in it 0600: it holds what sites sent)::

    <root>/<federation>/
        state.json                         the round state, rewritten atomically at every transition
        rounds/<r>/<site>-<update_id>.bin  each accepted update's payload, written before its ack
        rounds.jsonl                       the round log: one JSON object a line, appended and fsynced
        models/<r>.safetensors             the global model that round r trains from (float32)

``state.json`` is the only authority on which updates a round counts; file names are for people.
The round log holds typed records (:mod:`.roundlog`): :meth:`RoundStore.append_logs` writes them
and :meth:`RoundStore.read_log` gives them back, so no reader handles its lines as loose dicts.
Every write goes through :func:`fednca.atomic.write_bytes` (temporary file, fsync, rename, fsync
the folder), except the log, which is appended with one ``write`` and fsynced.

After a crash, call :meth:`RoundStore.recover` once, before anything else. It

* deletes temporary files left by a write that was interrupted (``.<name>.<random>.tmp``): the
  file they were to replace is still the old, whole version;
* cuts a torn last line off the log (an append the crash interrupted);
* loads ``state.json`` and checks that every update it counts is on disk: a missing one means the
  folder was damaged, and is an error rather than a silently smaller round;
* lists, and leaves in place, update files of the current round that the state does not count.
  Such a file was stored but the crash came before the state that counts it was saved, so its
  message was never acknowledged: the broker delivers it again and it is stored and counted then.
  A file left by a revoked site is listed too. None of them is ever aggregated.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from fednca.atomic import fsync_dir, remove_temporaries, write_bytes
from fednca.topics import TopicError, check_id

from .errors import RoundStateError, StoreError
from .round_state import AcceptedUpdate, RoundState
from .roundlog import LogRecord, decode, encode

__all__ = ["Recovery", "RoundStore", "StoreError"]

STATE_FORMAT = 1
_UPDATE_ID = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class Recovery:
    state: RoundState | None  # None: a federation that never opened a round
    orphans: tuple[Path, ...]  # update files of the current round that the state does not count
    removed: tuple[Path, ...]  # temporary files deleted
    log_cut: int  # bytes of a torn last log line removed


class RoundStore:
    def __init__(self, *, root: str | os.PathLike, federation: str) -> None:
        try:
            self.federation = check_id(federation, what="federation")
        except TopicError as e:
            raise StoreError(str(e)) from None
        self.folder = Path(root) / federation
        self._log_checked = False
        for folder in (self.folder, self.folder / "rounds", self.folder / "models"):
            _make_dir(folder)

    # The one coordinator ---------------------------------------------------------------------------

    def lock(self) -> "StoreLock":
        """Hold the store for one process: ``coordinator run`` and ``rollback`` take it, so a second
        coordinator (or a rollback under a running one) is refused instead of racing it."""
        return StoreLock(self.folder / "lock")

    # State ----------------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    def save_state(self, state: RoundState) -> None:
        if state.federation != self.federation:
            raise StoreError(f"state of federation {state.federation!r} does not belong in {self.folder}")
        document = {"format": STATE_FORMAT, "state": state.to_dict()}
        write_bytes(self.state_path, _json(document, indent=1).encode(), mode=0o600)

    def load_state(self) -> RoundState | None:
        path = self.state_path
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable ({e})") from None
        if not isinstance(document, dict) or set(document) != {"format", "state"} or document["format"] != STATE_FORMAT:
            raise StoreError(f"{path}: not a round state of format {STATE_FORMAT}")
        try:
            state = RoundState.from_dict(document["state"])
        except RoundStateError as e:
            raise StoreError(f"{path}: {e}") from None
        if state.federation != self.federation:
            raise StoreError(f"{path}: holds federation {state.federation!r}, expected {self.federation!r}")
        return state

    # Updates --------------------------------------------------------------------------------------

    def update_path(self, round: int, site: str, update_id: str) -> Path:
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise StoreError(f"round {round!r} is not an integer >= 0")
        try:
            check_id(site, what="site")
        except TopicError as e:
            raise StoreError(str(e)) from None
        if not isinstance(update_id, str) or not _UPDATE_ID.fullmatch(update_id):
            raise StoreError(f"update id {update_id!r} is not 1-64 lower-case hex digits")
        return self.folder / "rounds" / str(round) / f"{site}-{update_id}.bin"

    def put_update(self, round: int, site: str, update_id: str, payload: bytes) -> Path:
        """Write an update's payload durably; on return it survives a crash or a power cut."""
        path = self.update_path(round, site, update_id)
        _make_dir(path.parent)
        write_bytes(path, bytes(payload), mode=0o600)
        return path

    def read_update(self, round: int, site: str, update_id: str) -> bytes:
        path = self.update_path(round, site, update_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path}: accepted update is missing") from None

    def read_accepted(self, state: RoundState) -> Iterator[tuple[AcceptedUpdate, bytes]]:
        """The round's accepted updates with their payloads, one at a time, in acceptance order."""
        for entry in state.accepted:
            yield entry, self.read_update(state.round, entry.site, entry.update_id)

    # Log ------------------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.folder / "rounds.jsonl"

    def append_log(self, record: LogRecord) -> None:
        """Append one JSON line and fsync it."""
        self.append_logs([record])

    def append_logs(self, records: Sequence[LogRecord]) -> None:
        """Append one JSON line per record with a single write and a single fsync."""
        if not records:
            return
        if not self._log_checked:
            self._cut_torn_log_line()
        line = "".join(_json(encode(record)) + "\n" for record in records).encode()
        created = not self.log_path.exists()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.folder)

    def read_log(self) -> list[LogRecord]:
        """Every complete line of the log as its typed record; a torn last line (no newline yet) is
        left out. A line that is not a record of a known kind is an error that names the line."""
        try:
            lines = self.log_path.read_bytes().split(b"\n")[:-1]
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, 1):
            try:
                data = json.loads(line)
            except ValueError:
                raise StoreError(f"{self.log_path}: line {number} is not JSON") from None
            try:
                records.append(decode(data))
            except ValueError as e:
                raise StoreError(f"{self.log_path}: line {number} is not a round-log record ({e})") from None
        return records

    def _cut_torn_log_line(self) -> int:
        self._log_checked = True
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return 0
        keep = data.rfind(b"\n") + 1
        if keep == len(data):
            return 0
        with open(self.log_path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return len(data) - keep

    # Models ---------------------------------------------------------------------------------------

    def model_path(self, round: int) -> Path:
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise StoreError(f"round {round!r} is not an integer >= 0")
        return self.folder / "models" / f"{round}.safetensors"

    def save_model(
        self, round: int, tensors: Mapping[str, np.ndarray], *, metadata: Mapping[str, str] | None = None
    ) -> bytes:
        """Write the global model of ``round`` (float32 tensors) and return the bytes written."""
        for name, value in tensors.items():
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                raise StoreError(f"model tensor {name!r} must be a float32 numpy array")
        data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                      metadata=dict(metadata) if metadata else None)  # fmt: skip
        write_bytes(self.model_path(round), data, mode=0o600)
        return data

    def load_model(self, round: int) -> dict[str, np.ndarray]:
        path = self.model_path(round)
        try:
            return safetensors.numpy.load(path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{path}: no global model for round {round}") from None
        except SafetensorError as e:
            raise StoreError(f"{path}: not a readable safetensors file ({e})") from None

    def model_rounds(self) -> list[int]:
        names = (p.name.removesuffix(".safetensors") for p in (self.folder / "models").glob("*.safetensors"))
        return sorted(int(n) for n in names if n.isdigit())

    # Recovery -------------------------------------------------------------------------------------

    def recover(self) -> Recovery:
        removed = []
        rounds = sorted(p for p in (self.folder / "rounds").iterdir() if p.is_dir())
        for folder in (self.folder, self.folder / "models", *rounds):
            removed += remove_temporaries(folder)
        log_cut = self._cut_torn_log_line()
        state = self.load_state()
        orphans: list[Path] = []
        if state is not None:
            counted = {self.update_path(state.round, a.site, a.update_id) for a in state.accepted}
            for path in sorted(counted):
                if not path.is_file():
                    raise StoreError(f"{path}: the round state counts this update but it is missing")
            folder = self.folder / "rounds" / str(state.round)
            if folder.is_dir():
                orphans = [p for p in sorted(folder.glob("*.bin")) if p not in counted]
        return Recovery(state=state, orphans=tuple(orphans), removed=tuple(removed), log_cut=log_cut)


class StoreLock:
    """An exclusive ``flock`` on a file in the store, released when the process ends (even by
    SIGKILL), so a crash never leaves a stale lock behind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> "StoreLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.path.parent} is in use by a running coordinator; stop it first "
                             "(systemctl stop fednca-coordinator)") from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def _make_dir(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsync_dir(folder.parent)


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, indent=indent, separators=None if indent else (",", ":"))
