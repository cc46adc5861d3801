"""Frames that fail one by one: a raw frame that does not read back or does not denoise is
retried on a back-off of its own while the stage goes on with the other frames.

Each failure of a frame is counted in pn2v_live_stage_failures_total{stage, reason} and logged
as one line per frame at its 1st, 2nd, 4th, ... failure (`stage.Failures`, per item); the frame
is tried again after 1 s, doubling up to 5 min (`stage.backoff_seconds`), and listed with its
reason (`report`, the daemon's status) until it succeeds. A failure whose reason is not the
frame's own (a full disk, memory) is raised instead, so that the whole stage pauses or backs off.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

from pn2v_live.pipeline.stage import Failures, backoff_seconds, describe, failure_reason

STAGE_WIDE_REASONS = frozenset({"disk_full", "memory"})
REPORTED = 20  # failed frames `report` lists at most


@dataclass(frozen=True)
class FailedFrame:
    """The latest failure of one frame: what failed ("reading", "denoising"), why, how often."""

    acquisition: str
    t: int
    what: str
    reason: str
    error: str
    attempts: int


class FrameFailures:
    """The failing frames of the stage `stage` (thread-safe)."""

    def __init__(self, stage: str, log: logging.Logger) -> None:
        self._failures = Failures(stage, log, per_item=True)
        self._frames: dict[tuple[str, int], tuple[FailedFrame, float]] = {}  # → (it, retry at)
        self._lock = threading.Lock()

    def due(self, acquisition: str, t: int) -> bool:
        """False while frame `t` of `acquisition` waits out its back-off."""
        with self._lock:
            entry = self._frames.get((acquisition, t))
        return entry is None or entry[1] <= time.monotonic()

    def failed(self, acquisition: str, t: int, error: BaseException, what: str) -> None:
        """Record that `what` ("reading", "denoising") failed for frame `t` of `acquisition`;
        raises `error` when its reason is not the frame's own (`STAGE_WIDE_REASONS`)."""
        reason = failure_reason(error)
        if reason in STAGE_WIDE_REASONS:
            raise error
        with self._lock:
            previous = self._frames.get((acquisition, t))
            attempts = 1 + (previous[0].attempts if previous else 0)
            frame = FailedFrame(acquisition, t, what, reason, describe(error), attempts)
            self._frames[(acquisition, t)] = frame, time.monotonic() + backoff_seconds(attempts)
        self._failures.failed(error, f"{what} frame {t}", acquisition)

    def succeeded(self, acquisition: str, t: int) -> None:
        """Frame `t` of `acquisition` went through: it is no longer failing."""
        with self._lock:
            self._frames.pop((acquisition, t), None)

    def report(self) -> dict:
        """How many frames are failing, and the first REPORTED of them (as dicts)."""
        with self._lock:
            frames = [frame for frame, _ in self._frames.values()]
        return {"count": len(frames), "frames": [asdict(frame) for frame in frames[:REPORTED]]}
