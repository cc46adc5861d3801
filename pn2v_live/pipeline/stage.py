"""A pipeline stage: one thread repeating a unit of work, with start/stop and a health signal."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from pn2v_live.metrics import FRAMES_UNREADABLE
from pn2v_live.storage.store import Acquisition


class Stage:
    """Runs `work()` in a thread until stopped; `work()` returns True when it did something.

    When `work()` did nothing the thread waits `idle_seconds` before the next call. An exception
    in `work()` is logged and counted (`failures`), and the loop goes on after `idle_seconds`.
    `beat()` marks progress; the daemon pings systemd's watchdog only while every stage's
    last beat is recent (`alive`).
    """

    def __init__(self, name: str, idle_seconds: float):
        self.name = name
        self.idle_seconds = idle_seconds
        self.failures = 0
        self.last_error: str | None = None
        self.log = logging.getLogger(f"pn2v_live.{name}")
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()

    def work(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self._stopping.clear()
        self.beat()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> bool:
        """Ask the loop to end after the current unit of work; True if it ended in `timeout`."""
        self._stopping.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log.error("%s did not finish within %.0f s", self.name, timeout)
            return False
        return True

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def read_raw(self, acquisition: Acquisition, t: int) -> np.ndarray | None:
        """Raw frame `t` of `acquisition`, or None when it does not read back (a damaged chunk):
        logged and counted in pn2v_live_frames_unreadable_total under this stage's name."""
        try:
            return acquisition.read_raw(t)
        except Exception as error:  # codec or OS error of a damaged chunk
            FRAMES_UNREADABLE.labels(self.name).inc()
            self.log.error(
                "raw frame %d does not read back, left out for now: %s: %s",
                t,
                type(error).__name__,
                error,
                extra={"acquisition": acquisition.name},
            )
            return None

    def alive(self, max_silence: float) -> bool:
        """The thread runs and has beaten within the last `max_silence` seconds."""
        running = self._thread is not None and self._thread.is_alive()
        return running and time.monotonic() - self._last_beat < max_silence

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.beat()
            try:
                busy = self.work()
            except Exception as error:  # a stage must outlive one bad frame or round
                self.failures += 1
                self.last_error = f"{type(error).__name__}: {error}"
                self.log.exception("%s failed: %s", self.name, self.last_error)
                busy = False
            if not busy:
                self._stopping.wait(self.idle_seconds)
