"""The coordinator's durable files for one federation: round state, accepted updates, log, models.

Layout (the folder is 0700 and every file in it 0600: it holds what sites sent)::

    <root>/<federation>/
        state.json                         a compact snapshot of the round state, at each transition
        rounds/<r>/<site>-<update_id>.bin  each accepted update's payload, written before its ack
        rounds/<r>/deltas/                 the verified deltas of round r, for the close (.spool)
        rounds.jsonl                       the round log: one JSON object a line, appended and fsynced
        models/<r>.safetensors             the global model that round r trains from (float32)

The round state is ``state.json`` plus the round log after it. :meth:`RoundStore.save_state` costs
O(1) per accepted update however many the round counts: between transitions (a round opened,
extended, closed, the enrolment changed) the updates a batch accepts become durable as their
``update_accepted`` lines, appended with the batch's other lines in one write and one fsync; only
a transition rewrites ``state.json``, whole and compact, naming the length of the log it covers
(``log_bytes``). :meth:`RoundStore.load_state` reads the snapshot and replays the acceptances the
log holds after it (:func:`.recovery.replay`). That pair is the only authority on which updates a
round counts; file names are for people.
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
import tempfile
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from fednca.atomic import fsync_dir, remove_temporaries, write_bytes
from fednca.topics import TopicError, check_id

from fednca.rounds_vocab import RoundStatus

from .errors import RoundStateError, StoreError
from .recovery import replay
from .round_state import AcceptedUpdate, RoundState
from .roundlog import LogRecord, UpdateAcceptedRecord, decode, encode

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
        self._durable: RoundState | None = None  # the state on disk, as this object last wrote or read it
        self._journaled: set[tuple[int, str, str]] = set()  # acceptance lines written for a bare save_state
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

    def save_state(self, state: RoundState, *, log: Sequence[LogRecord] = ()) -> None:
        """Make ``state`` durable together with ``log``, the round-log lines of the same batch.

        When ``state`` differs from the state last saved only by accepted updates appended to the
        same open round, those updates are written as ``update_accepted`` lines (the batch's own,
        or lines made here when ``log`` lacks them): one append, one fsync. Otherwise the lines are
        appended, then ``state.json`` is rewritten atomically, naming the log length it covers.
        """
        if state.federation != self.federation:
            raise StoreError(f"state of federation {state.federation!r} does not belong in {self.folder}")
        lines = self._not_journaled(log)
        before, self._durable = self._durable, None  # unknown until the writes below are done
        if before is not None and _only_accepted_grew(before, state):
            named = {(r.site, r.update_id) for r in lines if isinstance(r, UpdateAcceptedRecord) and r.round == state.round}
            made = [_acceptance(state.round, a) for a in state.accepted[len(before.accepted):]
                    if (a.site, a.update_id) not in named]  # fmt: skip
            self._append(lines + made)
            self._journaled.update((r.round, r.site, r.update_id) for r in made)
        else:
            self._append(lines)
            size = self.log_path.stat().st_size if self.log_path.exists() else 0
            document = {"format": STATE_FORMAT, "state": state.to_dict(), "log_bytes": size}
            write_bytes(self.state_path, _json(document).encode(), mode=0o600)
        self._durable = state

    def load_state(self) -> RoundState | None:
        """The snapshot in ``state.json`` with the acceptances the log holds after it."""
        path = self.state_path
        try:
            document = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable ({e})") from None
        if (not isinstance(document, dict) or set(document) - {"log_bytes"} != {"format", "state"}
                or document["format"] != STATE_FORMAT):  # fmt: skip
            raise StoreError(f"{path}: not a round state of format {STATE_FORMAT}")
        try:
            state = RoundState.from_dict(document["state"])
        except RoundStateError as e:
            raise StoreError(f"{path}: {e}") from None
        if state.federation != self.federation:
            raise StoreError(f"{path}: holds federation {state.federation!r}, expected {self.federation!r}")
        offset = document.get("log_bytes")
        if offset is not None and state.status == RoundStatus.OPEN:
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise StoreError(f"{path}: log_bytes must be an integer >= 0, got {offset!r}")
            state = replay(state, self._records_from(offset))
        self._durable = state
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

    def spool_folder(self, round: int) -> Path:
        """Where the verified deltas of ``round`` are kept until it is aggregated (:mod:`.spool`)."""
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            raise StoreError(f"round {round!r} is not an integer >= 0")
        return self.folder / "rounds" / str(round) / "deltas"

    def put_updates(self, items: Sequence[tuple[int, str, str, bytes]], *,
                    pool: Executor | None = None) -> list[Path]:  # fmt: skip
        """Write several payloads ((round, site, update id, payload) each) durably, as
        :meth:`put_update` does one: each to a temporary file, fsynced (on ``pool``'s threads, so
        the file system commits them together), then all renamed, then each folder fsynced once
        rather than once per file. On return all of them survive a crash; a crash before leaves
        temporaries that :meth:`recover` deletes, never a torn update file."""
        paths = [self.update_path(r, site, uid) for r, site, uid, _ in items]
        for folder in sorted({p.parent for p in paths}):
            _make_dir(folder)

        def write(job: tuple[Path, bytes]) -> str:
            path, payload = job
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(payload)
                    f.flush()
                    os.fsync(f.fileno())
            except BaseException:
                os.unlink(tmp)
                raise
            return tmp

        jobs = [(path, bytes(item[3])) for path, item in zip(paths, items)]
        temporaries = list(pool.map(write, jobs)) if pool is not None and len(jobs) > 1 else [write(j) for j in jobs]
        for tmp, path in zip(temporaries, paths):
            os.replace(tmp, path)
        for folder in sorted({p.parent for p in paths}):
            fsync_dir(folder)
        return paths

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
        """Append one JSON line per record with a single write and a single fsync (an acceptance
        line that :meth:`save_state` already wrote for the same update is not written twice)."""
        self._append(self._not_journaled(records))

    def _not_journaled(self, records: Sequence[LogRecord]) -> list[LogRecord]:
        if not self._journaled:
            return list(records)
        out = []
        for r in records:
            key = (r.round, r.site, r.update_id) if isinstance(r, UpdateAcceptedRecord) else None
            if key is not None and key in self._journaled:
                self._journaled.discard(key)
            else:
                out.append(r)
        return out

    def _append(self, records: Sequence[LogRecord]) -> None:
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
        return self._records_from(0)

    def _records_from(self, offset: int) -> list[LogRecord]:
        try:
            with open(self.log_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:
                    raise StoreError(f"{self.log_path}: {size} bytes, but the round state covers {offset}")
                f.seek(offset)
                lines = f.read().split(b"\n")[:-1]
        except FileNotFoundError:
            if offset:
                raise StoreError(f"{self.log_path}: missing, but the round state covers {offset} bytes of it") from None
            return []
        records = []
        for number, line in enumerate(lines, 1):
            where = f"line {number}" if offset == 0 else f"line {number} after byte {offset}"
            try:
                data = json.loads(line)
            except ValueError:
                raise StoreError(f"{self.log_path}: {where} is not JSON") from None
            try:
                records.append(decode(data))
            except ValueError as e:
                raise StoreError(f"{self.log_path}: {where} is not a round-log record ({e})") from None
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


def _only_accepted_grew(before: RoundState, after: RoundState) -> bool:
    """Whether ``after`` is ``before`` with accepted updates appended to the same open round (O(1)
    for states derived from one another: the enrolment and the accepted sequence are shared)."""
    open_ = RoundStatus.OPEN
    return (
        before.status == open_ and after.status == open_ and before.round == after.round
        and before.deadline == after.deadline and before.extensions == after.extensions
        and before.model_sha256 == after.model_sha256 and before.opened_at == after.opened_at
        and before.config == after.config
        and (before.enrolled is after.enrolled or before.enrolled == after.enrolled)
        and after.accepted.extends(before.accepted)  # type: ignore[attr-defined]
    )  # fmt: skip


def _acceptance(round: int, a: AcceptedUpdate) -> UpdateAcceptedRecord:
    return UpdateAcceptedRecord(round=round, at=a.accepted_at, site=a.site, update_id=a.update_id,
                                samples=a.samples, steps=a.steps, partial=a.partial,
                                staleness=a.staleness)  # fmt: skip


def _make_dir(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fsync_dir(folder.parent)


def _json(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, indent=indent, separators=None if indent else (",", ":"))
