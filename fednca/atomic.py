"""Durable file writes: temporary file in the same folder, fsync, rename, fsync the folder.

A reader (or a process restarted after SIGKILL) sees either the old file or the new one, never a
torn mix, and once the call returns the new content survives a power cut.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


_TEMPORARY = re.compile(r"\..+\.tmp")  # what write_bytes leaves behind when it is interrupted


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted write left in ``folder``; returns them."""
    folder = Path(folder)
    removed = []
    for name in sorted(os.listdir(folder)):
        if _TEMPORARY.fullmatch(name) and (folder / name).is_file():
            try:
                os.unlink(folder / name)
            except FileNotFoundError:
                continue
            removed.append(folder / name)
    if removed:
        fsync_dir(folder)
    return removed


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically and durably, with permission bits ``mode``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str, *, mode: int = 0o644) -> None:
    write_bytes(path, text.encode(), mode=mode)
