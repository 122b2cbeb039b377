"""systemd notifications (``sd_notify``) without libsystemd: datagrams to ``$NOTIFY_SOCKET``.

Shared by the edge daemon and the coordinator, both ``Type=notify`` units: ``READY=1`` once the
service runs, ``STATUS=...`` (one line) on every state change, ``WATCHDOG=1`` at half of
``$WATCHDOG_USEC`` (only from the main loop: a hung trainer or coordinator stops the pings and
systemd restarts the service), ``STOPPING=1`` when a stop begins. A leading ``@`` in the socket
path names the abstract namespace. Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping

log = logging.getLogger("fednca.notify")
MAX_STATUS = 200


class Notifier:
    def __init__(self, *, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET") or None
        if path is not None and path.startswith("@"):
            path = "\0" + path[1:]
        self._address = path
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and (not pid or pid == str(os.getpid())):
            try:
                value = int(usec)
            except ValueError:
                value = 0
            if value > 0:
                self.watchdog_interval = value / 2e6  # seconds: ping at half the timeout
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, text: str) -> bool:
        """Send one notification; False when not under systemd or the socket refused it."""
        if self._address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(text.encode(), self._address)
            return True
        except OSError as e:
            log.warning("sd_notify to %r failed: %s", self._address, e)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_STATUS]
