"""Findings of a pre-flight check: what is wrong, where, and how to fix it.

The daemon's ``--check-config`` and the coordinator's ``check`` report every problem they find at
once, so each check returns findings instead of raising. A finding names the configuration key at
fault, the file or folder (when there is one), the problem and the fix. An *error* would stop the
service or make it fail at run time (exit status 2); a *warning* is worth knowing but does not (a
pair that ``data.skip_bad`` will leave out, a CA left to the system's). The file-access helpers
here try what the service will do (open, create) rather than read permission bits, which an ACL,
a read-only mount or root's privileges make lie.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    key: str  # the configuration key at fault, dotted (``data.folder``, ``keys.site``)
    problem: str
    fix: str
    path: str | None = None  # the file or folder at fault
    severity: Severity = "error"

    def line(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.severity}: {self.key}: {where}{self.problem}\n    fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "key": self.key, "path": self.path, "problem": self.problem,
                "fix": self.fix}


@dataclass(frozen=True)
class Report:
    """Every finding and note of one check, in the order found."""

    source: str  # the configuration file checked
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()  # what was checked and found fine, e.g. the split's sizes
    facts: dict[str, Any] = field(default_factory=dict)  # numbers for --json (pairs, patients...)

    @property
    def errors(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == "error")

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """``config`` (the file checked), ``ok``, ``problems`` (the errors), ``warnings``, ``notes``, the facts."""
        return {"config": self.source, "ok": self.ok, "problems": [f.to_dict() for f in self.errors],
                "warnings": [f.to_dict() for f in self.findings if f.severity != "error"],
                "notes": list(self.notes), **self.facts}

    def lines(self) -> list[str]:
        out = [f"# {n}" for n in self.notes]
        out += [f.line() for f in self.findings]
        if self.ok:
            warned = f" ({len(self.findings)} warning(s))" if self.findings else ""
            out.append(f"# {self.source}: configuration and the files it names are fine{warned}")
        else:
            out.append(f"# {self.source}: {len(self.errors)} problem(s) that would stop the service "
                       "or fail at run time")
        return out


def open_problem(path: Path) -> str | None:
    """Why ``path`` cannot be opened for reading as a regular file by this process, or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot reach it ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    return None


def private_mode_problem(path: Path) -> str | None:
    """Why a private file's mode is too open (group or others may read it), or None."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"readable by group or others (mode {mode:04o})"
    return None


def writable_folder_problem(folder: Path) -> str | None:
    """Why files cannot be made in ``folder`` (or ``folder`` made, with its parents), or None.

    An existing folder is tried for real (a temporary file made and removed).
    """
    if folder.exists():
        if not folder.is_dir():
            return "exists and is not a folder"
        probe = folder / f".fednca-check-{os.getpid()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            return f"cannot write in it ({e.strerror})"
        os.close(fd)
        probe.unlink()
        return None
    parent = folder.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be made: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"does not exist and cannot be made: {parent} is not writable"
    return None
