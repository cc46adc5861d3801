"""A pipeline stage: one thread repeating a unit of work, with start/stop and an honest health.

Liveness: a stage makes progress when `work()` returns (it did something, or had nothing to
do), or when it calls `beat()` inside a long unit of work; a `work()` that raises is no
progress. The daemon pings systemd's watchdog only while every stage and thread is healthy
(`Liveness.healthy`): it made progress within the last `max_silence` seconds, or it is paused
on a condition outside the daemon that a restart would not cure (the store's disk is full)
while its loop still comes round.

Failures (`Failures`): each one is counted in `pn2v_live_stage_failures_total{stage, reason}`
with a short `reason` (`failure_reason`); the loop then waits before the next try, 1 s
doubling up to 5 min (a disk-full pause ends early once space is freed), and logs one line per
distinct failure — its first occurrence (with the traceback unless the reason says it all),
then again at the 2nd, 4th, 8th, ... occurrence or after an hour, each with its count — and
one line when the stage works again.
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.telemetry import FRAMES_UNREADABLE, STAGE_FAILURES

MIN_BACKOFF_SECONDS = 1.0  # wait after a first failure, doubled after each one in a row ...
MAX_BACKOFF_SECONDS = 300.0  # ... up to this
RELOG_SECONDS = 3600.0  # a failure that keeps coming is logged at least this often
FREED_BYTES = 1 << 20  # this much more free space than at the failure ends a disk-full pause
PAUSE_SLICE_SECONDS = 1.0  # a pause looks at stop requests and free space this often
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# Reasons a stage waits out while counting as healthy: a restart would not cure them.
PAUSING_REASONS = frozenset({"disk_full"})
HEALTHY_STATES = frozenset({"ok", "retrying", "paused"})
QUIET_REASONS = frozenset({"disk_full"})  # their first log line needs no traceback


def failure_reason(error: BaseException) -> str:
    """A short fixed label for why a unit of work failed (a metric label): `disk_full`
    (ENOSPC or EDQUOT anywhere in the exception's chain, or SQLite's "disk is full"),
    `permission`, `io` (other OS errors), `memory`, `diverged` (non-finite numbers) or `error`."""
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return "disk_full"
        if isinstance(cause, sqlite3.Error) and (
            getattr(cause, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            or "disk is full" in str(cause)
        ):
            return "disk_full"
    if isinstance(error, PermissionError) or (
        isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM)
    ):
        return "permission"
    if isinstance(error, OSError):
        return "io"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return "memory"  # torch's OutOfMemoryError is a RuntimeError
    if isinstance(error, FloatingPointError):
        return "diverged"
    return "error"


def _chain(error: BaseException):
    """`error` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and len(seen) < 16:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def backoff_seconds(in_a_row: int) -> float:
    """The wait after `in_a_row` failures in a row: 1 s, 2 s, 4 s, ... at most 5 min."""
    return min(MAX_BACKOFF_SECONDS, MIN_BACKOFF_SECONDS * 2 ** min(max(in_a_row - 1, 0), 30))


def free_bytes(path: Path | None) -> int | None:
    """Bytes free to this user on the file system holding `path` (None when unknown)."""
    if path is None:
        return None
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@dataclass(frozen=True)
class Liveness:
    """What the health check knows about one long-running thread.

    `state`: healthy are "ok", "retrying" (failed lately, within its timeout) and "paused"
    (waits out a full disk, its loop still comes round); unhealthy are "failing" (no success
    for `max_silence` seconds, only failures), "stuck" (no progress and no failure: hangs),
    "dead" (the thread ended) and "stopped" (asked to stop).
    """

    name: str
    state: str
    reason: str | None = None
    detail: str | None = None

    @property
    def healthy(self) -> bool:
        return self.state in HEALTHY_STATES

    def __str__(self) -> str:
        why = ": ".join(part for part in (self.reason, self.detail) if part)
        return f"{self.name} {self.state}" + (f" ({why})" if why else "")

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "reason": self.reason,
            "detail": self.detail,
            "healthy": self.healthy,
        }


def thread_liveness(name: str, thread: threading.Thread | None) -> Liveness:
    """The liveness of a thread known only by whether it runs (a server's loop)."""
    if thread is not None and thread.is_alive():
        return Liveness(name, "ok")
    return Liveness(name, "dead", detail="its thread ended")


class Failures:
    """The failures of one loop, named `stage` in log lines and metrics (thread-safe).

    `failed(error)` counts the failure, logs it when due (see the module docstring) and returns
    the seconds to wait before the next try; `succeeded()` ends a run of failures (logging that
    it works again). `space_returned()` says whether a disk-full pause may end early. With
    `per_item`, failures are of items that others retry (frames a sender resends, status
    requests), and the log lines say nothing of a next try.
    """

    def __init__(
        self,
        stage: str,
        log: logging.Logger,
        disk_path: Path | None = None,
        per_item: bool = False,
    ):
        self.stage, self.log, self.disk_path, self.per_item = stage, log, disk_path, per_item
        self.in_a_row = 0  # failures since the last success
        self.reason: str | None = None  # of the latest failure
        self.last_error: str | None = None
        self.since: float | None = None  # wall time of the first failure in a row
        self.last_failed = -math.inf  # monotonic time of the latest failure
        self._seen: dict[tuple[str, str, str], tuple[int, float]] = {}  # → (count, logged at)
        self._free_at_failure: int | None = None
        self._lock = threading.Lock()

    def failed(self, error: BaseException, what: str = "", acquisition: str | None = None) -> float:
        """Count and maybe log one failure of `what` (a fixed phrase, e.g. "storing a frame";
        default the stage's work), on `acquisition` if one; the seconds to wait before trying
        again."""
        reason = failure_reason(error)
        STAGE_FAILURES.labels(self.stage, reason).inc()
        free = free_bytes(self.disk_path) if reason == "disk_full" else None
        now = time.monotonic()
        with self._lock:
            self.in_a_row += 1
            if self.in_a_row == 1:
                self.since = time.time()
            self.reason, self.last_error, self.last_failed = reason, describe(error), now
            self._free_at_failure = free
            delay = backoff_seconds(self.in_a_row)
            key = (what, reason, type(error).__name__)
            count, logged = self._seen.get(key, (0, -math.inf))
            count += 1
            due = count & (count - 1) == 0 or now - logged >= RELOG_SECONDS
            self._seen[key] = (count, now if due else logged)
            in_a_row, since = self.in_a_row, self.since
        if not due:
            return delay
        subject = f"{self.stage}: {what}" if what else self.stage
        extra = {"acquisition": acquisition} if acquisition else None
        if self.per_item:
            then = "logged again at the 2nd, 4th, 8th, ... time"
        elif count == 1:
            then = (
                f"trying again in {delay:.0f} s, then less and less often (at most every "
                f"{MAX_BACKOFF_SECONDS / 60:.0f} min) while it fails; logged again at the 2nd, "
                "4th, 8th, ... time"
            )
        else:
            then = f"next try in {delay:.0f} s"
        if count == 1:
            self.log.error(
                "%s failed (%s): %s; %s",
                subject,
                reason,
                describe(error),
                then,
                exc_info=error if reason not in QUIET_REASONS else None,
                extra=extra,
            )
        else:
            self.log.error(
                "%s failed again (%s, %d times so far, %d in a row since %s): %s; %s",
                subject,
                reason,
                count,
                in_a_row,
                _clock(since),
                describe(error),
                then,
                extra=extra,
            )
        return delay

    def succeeded(self, what: str = "", quiet: bool = False) -> None:
        """The loop works again: end a run of failures (one log line if there was one, unless
        `quiet`: for work that fails item by item, where a success says little)."""
        with self._lock:
            if not self.in_a_row:
                return
            in_a_row, since, reason = self.in_a_row, self.since, self.reason
            self.in_a_row, self.since, self.reason, self._free_at_failure = 0, None, None, None
        if quiet:
            return
        self.log.info(
            "%s works again after %d failure(s) in a row (last %s) since %s",
            f"{self.stage}: {what}" if what else self.stage,
            in_a_row,
            reason,
            _clock(since),
        )

    @property
    def pausing(self) -> bool:
        """Whether the latest failures are of a kind the stage waits out (disk full)."""
        return self.in_a_row > 0 and self.reason in PAUSING_REASONS

    def space_returned(self) -> bool:
        """During a disk-full run of failures: whether FREED_BYTES more than at the latest
        failure are free now on the store's file system (then try again at once)."""
        with self._lock:
            before = self._free_at_failure if self.reason == "disk_full" else None
        if before is None:
            return False
        now = free_bytes(self.disk_path)
        return now is not None and now >= before + FREED_BYTES

    def summary(self) -> str:
        """E.g. "3 failure(s) in a row since 12:00:01, last OSError: ..."."""
        with self._lock:
            return (
                f"{self.in_a_row} failure(s) in a row since {_clock(self.since)}, "
                f"last {self.last_error}"
            )


def _clock(wall: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) if wall is not None else "?"


class Stage:
    """Runs `work()` in a thread until stopped; `work()` returns True when it did something.

    When `work()` did nothing the thread waits `idle_seconds` before the next call. When it
    raises, the failure goes to `failure_log` (counted, logged when due) and the thread waits
    the back-off before the next call; a call returning True ends the run of failures.
    `disk_path` (the store's root) lets a disk-full pause end as soon as space is freed.
    """

    def __init__(self, name: str, idle_seconds: float, disk_path: Path | None = None):
        self.name = name
        self.idle_seconds = idle_seconds
        self.failures = 0
        self.last_error: str | None = None
        self.log = logging.getLogger(f"pn2v_live.{name}")
        self.failure_log = Failures(name, self.log, disk_path)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_beat = time.monotonic()  # progress: work() returned, or beat() inside it
        self._last_turn = time.monotonic()  # the loop came round (also while paused)

    def work(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self._stopping.clear()
        self.beat()
        self._last_turn = time.monotonic()
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
        """Mark progress inside a long unit of work (a training step, a file of a backlog)."""
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

    def read_stored(
        self, acquisition: Acquisition, numbers: Iterable[int]
    ) -> dict[int, np.ndarray]:
        """{t: raw frame} of the frames `numbers` that are stored and read back (`read_raw`)."""
        frames = {t: self.read_raw(acquisition, t) for t in numbers if acquisition.is_stored(t)}
        return {t: frame for t, frame in frames.items() if frame is not None}

    def liveness(self, max_silence: float) -> Liveness:
        """This stage's state for the health check (see `Liveness`)."""
        now = time.monotonic()
        failures = self.failure_log
        if self._thread is None or not self._thread.is_alive():
            state = "stopped" if self.stopping else "dead"
            return Liveness(self.name, state, failures.reason, self.last_error)
        if failures.pausing and now - self._last_turn < max_silence:
            return Liveness(self.name, "paused", failures.reason, failures.summary())
        if now - self._last_beat >= max_silence:
            if failures.in_a_row and failures.last_failed > self._last_beat:
                return Liveness(self.name, "failing", failures.reason, failures.summary())
            silent = f"no progress for {now - self._last_beat:.0f} s"
            return Liveness(self.name, "stuck", None, silent)
        if failures.in_a_row:
            return Liveness(self.name, "retrying", failures.reason, failures.summary())
        return Liveness(self.name, "ok")

    def health_reports(self, max_silence: float) -> list[Liveness]:
        """The liveness of every long-running thread of this part (here: one)."""
        return [self.liveness(max_silence)]

    def alive(self, max_silence: float) -> bool:
        """Whether the health check counts this stage as healthy (see `liveness`)."""
        return self.liveness(max_silence).healthy

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._last_turn = time.monotonic()
            try:
                busy = self.work()
            except Exception as error:  # a stage must outlive one bad frame or round
                self.failures += 1
                self.last_error = describe(error)
                self._pause(self.failure_log.failed(error))
                continue
            if busy:
                self.failure_log.succeeded()
            self.beat()
            if not busy:
                self._stopping.wait(self.idle_seconds)

    def _pause(self, seconds: float) -> None:
        """Wait `seconds` after a failure; a stop request ends the wait, and so does space freed
        on the store's disk during a disk-full pause."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if self._stopping.wait(min(PAUSE_SLICE_SECONDS, left)):
                return
            self._last_turn = time.monotonic()
            if self.failure_log.space_returned():
                return
