"""One exception root for the edge daemon.

``DaemonError`` is what the daemon raises on purpose: a state folder it cannot use, a trainer
child that speaks out of turn, a lifecycle event the shell should never have sent. It sits under
:class:`fednca.errors.FedNCAError`, so the daemon's command line reports any of them as one line
and exits; a plain Python exception escaping from here is our own bug.

The names are the daemon's own (``IllegalTransition``, ``StateFolderError``), distinct from the
coordinator's round policy (``IllegalEvent``, ``StateError``), so a reader of a log or a traceback
knows which side raised it.
"""

from __future__ import annotations

from fednca.errors import FedNCAError


class DaemonError(FedNCAError):
    """Root of every error the daemon raises on purpose."""


class LifecycleError(DaemonError):
    """Root of the lifecycle state machine's errors."""


class IllegalTransition(LifecycleError):
    """The shell passed something that is not a lifecycle event, an event the current state has
    no transition for, or a time that is not a number (a bug in the shell); the state is unchanged."""


class StateFolderError(DaemonError):
    """The state folder is unusable or holds a damaged file; the message names it."""


class DamagedFile(StateFolderError):
    """A file of the state folder is readable but not what it should be (truncated, garbled,
    not verifying); ``path`` names it, so the daemon can move it aside and go on."""

    def __init__(self, path: object, message: str) -> None:
        super().__init__(message)
        self.path = path


class TrainerError(DaemonError):
    """The trainer child cannot start or go on (another trainer holds the state folder, the saved
    announcement is of another round); it reports this on its pipe and exits."""


class CheckpointMismatch(DaemonError):
    """The checkpoint is unreadable or belongs to another round or model than the one to submit."""


class TrainerProtocolError(DaemonError):
    """A message between the daemon and its trainer child is not one of theirs (bad JSON, an
    unknown kind, a missing or mistyped field)."""
