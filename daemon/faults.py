"""The daemon's answers to faults of its device and of the network, apart from the service loop.

What goes wrong (:mod:`.trouble` says it once and times the next try):

- the state folder cannot be opened or read (:func:`open_until_usable`): the daemon waits before
  anything starts, pinging the watchdog and answering a stop, instead of exiting into a crash loop;
- the disk refuses a write (:func:`storage_problem`): the caller keeps what it could not store and
  tries again later;
- the broker refuses the site's credentials (:class:`BrokerLink`): the client gives up on such a
  refusal, so the daemon asks again itself, on the back-off, until it is let in.

Each line says what, where and what to do; the texts stay the same across repeats, so a repeat is
counted, not logged.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Callable, TypeVar

from fednca.transport.base import Client, ConnectRefused

from .errors import StateFolderError
from .trouble import Troubles

log = logging.getLogger("fednca.daemon")

T = TypeVar("T")

ADVICE = {
    errno.ENOSPC: "free space on its disk",
    errno.EDQUOT: "raise the disk quota or free space",
    errno.EACCES: "let the daemon's user write there (chown/chmod)",
    errno.EPERM: "let the daemon's user write there (chown/chmod)",
    errno.EROFS: "its file system is read-only: remount it read-write or set another state_dir",
    errno.EIO: "its disk reports I/O errors: check or replace it",
}


def why(e: OSError) -> str:
    """``No space left on device, ENOSPC``: the system's words and the name to search for."""
    name = errno.errorcode.get(e.errno or 0, "")
    return f"{e.strerror or e}" + (f", {name}" if name else "")


def folder_problem(folder: Path, e: Exception) -> str:
    if isinstance(e, OSError):
        advice = ADVICE.get(e.errno or 0, "check the folder and its disk")
        where = e.filename or folder
        return f"state folder {folder} unusable ({where}: {why(e)}): {advice}; the daemon waits and tries again"
    return f"state folder unusable: {e}; the daemon waits and tries again"


def storage_problem(folder: Path, e: OSError) -> str:
    advice = ADVICE.get(e.errno or 0, "check the folder and its disk")
    return (f"cannot write in the state folder {folder} ({why(e)}): {advice}; nothing stored is lost, and the "
            f"daemon tries again later")


def open_until_usable(*, folder: Path, attempt: Callable[[], T], release: Callable[[], None], troubles: Troubles,
                      clock: Callable[[], float], waiting: Callable[[str], None],
                      pause: Callable[[float], bool]) -> T | None:
    """``attempt()`` (open the folder and read it) until it works; None if ``pause`` says a stop
    was asked. After a failure: ``release()`` (unlock), one line, ``waiting`` told once (systemd's
    READY, so it does not kill a daemon that waits for its disk), then ``pause(wait)``."""
    told = False
    while True:
        try:
            result = attempt()
        except (OSError, StateFolderError) as e:
            release()
            wait = troubles.report("folder", folder_problem(folder, e), clock())
            if not told:
                waiting(f"waiting for the state folder {folder}")
                told = True
            if pause(wait):
                return None
            continue
        troubles.clear("folder", f"state folder {folder} usable again")
        return result


class BrokerLink:
    """The connection's health as the daemon sees it: refusals said once and asked again on a
    back-off (the client does not retry a refusal), a lost connection said once."""

    def __init__(self, *, client: Client, troubles: Troubles, clock: Callable[[], float], site: str,
                 timeout: float) -> None:
        self.client = client
        self.troubles = troubles
        self.clock = clock
        self.site = site
        self.timeout = timeout
        self.refused = False  # the broker refused the credentials: the daemon asks again itself
        self.was_connected = False
        self._seen_error: object = None  # the client's last error already looked at

    def connect(self) -> bool:
        """Connect (or ask again after a refusal); False while not connected."""
        try:
            connected = self.client.connect(timeout=self.timeout)
        except ConnectRefused as e:
            self.refused = True
            self._refused(e)
            return False
        self.refused = False
        return connected

    def watch(self) -> bool:
        """Look at the connection (every turn of the loop); True when it has just been made."""
        connected = self.client.connected
        made = connected and not self.was_connected
        if connected:
            self.troubles.clear("broker", "connected to the broker again")
            self.refused = False
        else:
            error = getattr(self.client, "last_error", None)
            if error is not None and error is not self._seen_error:
                self._seen_error = error
                if isinstance(error, ConnectRefused):
                    self.refused = True  # the client gave up: ask again on the back-off
                    self._refused(error)
                elif self.was_connected or self.troubles.active("broker"):
                    self.troubles.report("broker", f"not connected to the broker: {error}; the client retries",
                                         self.clock(), level=logging.WARNING)
            if self.refused and self.troubles.due("broker", self.clock()):
                self.connect()
        self.was_connected = self.client.connected
        return made

    def _refused(self, e: ConnectRefused) -> None:
        self.troubles.report(
            "broker", f"the broker refused site {self.site} ({e.reason}): check broker.password and broker.tls in "
            f"the configuration; if they are right, the site may have been revoked (ask the federation's operator). "
            f"Work and stored updates are kept; the daemon asks again with a growing wait", self.clock())
