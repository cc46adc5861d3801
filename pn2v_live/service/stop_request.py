"""A stop request that SIGTERM/SIGINT deliver without a lock, for the main thread to wait on.

A Python signal handler runs in the main thread between two bytecodes, possibly while that
thread holds a lock. `threading.Event.set()` takes the lock of the Event's Condition, so a
handler calling it deadlocks whenever the signal lands while the main thread is inside that
Event's `wait()` holding the same lock: the process then never stops. Here the handler does
nothing; `signal.set_wakeup_fd` makes the interpreter's C-level handler write the signal number
to a socket, and `wait` polls that socket. A request from another thread (`set`) writes a
byte to the same socket.
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REQUEST = 0  # the byte `set` writes; signal numbers are 1 and up


class StopRequest:
    """Set by SIGTERM/SIGINT (once `install`ed) or `set()`; `wait(timeout)` blocks until then."""

    def __init__(self) -> None:
        self._receiver, self._sender = socket.socketpair()
        self._receiver.setblocking(False)
        self._sender.setblocking(False)
        self._poll = select.poll()  # not select(): descriptors past 1023 are fine
        self._poll.register(self._receiver, select.POLLIN)
        self._requested = False
        self._restore: list[tuple[int, object]] = []  # (signal, previous handler)
        self._previous_wakeup_fd: int | None = None

    def install(self) -> None:
        """Route SIGTERM and SIGINT here (main thread only; `uninstall` restores)."""
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self._sender.fileno(), warn_on_full_buffer=False
        )
        self._restore = [(s, signal.signal(s, _wake_only)) for s in STOP_SIGNALS]

    def uninstall(self) -> None:
        """Give SIGTERM/SIGINT and the wake-up descriptor back to their earlier owners."""
        for signum, handler in self._restore:
            signal.signal(signum, handler)
        self._restore = []
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self._previous_wakeup_fd = None

    def set(self) -> None:
        """Request a stop (any thread)."""
        with contextlib.suppress(BlockingIOError):  # full of earlier requests: already requested
            self._sender.send(bytes([REQUEST]))

    def wait(self, timeout: float | None) -> bool:
        """Block up to `timeout` seconds (None: until woken); True once a stop was requested."""
        milliseconds = None if timeout is None else 1000 * timeout
        if not self._requested and self._poll.poll(milliseconds):
            wakers = self._receiver.recv(4096)
            self._requested = any(b == REQUEST or b in STOP_SIGNALS for b in wakers)
        return self._requested

    def close(self) -> None:
        self.uninstall()
        self._receiver.close()
        self._sender.close()


def _wake_only(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the wake-up byte already carries the signal to `wait`."""
