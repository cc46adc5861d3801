"""systemd's notify protocol (sd_notify): datagrams such as READY=1 to the socket in NOTIFY_SOCKET.

Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class SystemdNotifier:
    """Sends state changes to systemd; `watchdog_interval` says how often to ping (seconds)."""

    def __init__(self, environ: dict[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address or None
        self._socket = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        watchdog_pid = environ.get("WATCHDOG_PID")
        watchdog_usec = environ.get("WATCHDOG_USEC")
        ours = watchdog_pid is None or watchdog_pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(watchdog_usec) / 1e6 / 2 if watchdog_usec and ours else None
        )

    def notify(self, *lines: str) -> None:
        """Send `lines` (e.g. "READY=1", "STATUS=...") as one datagram."""
        if self._socket is None:
            return
        self._socket.sendto("\n".join(lines).encode(), self._address)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str = "draining") -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
