"""How much of the recent past was spent busy: the trainer's measure of its share of the machine."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class BusyTime:
    """The share of the last `window` seconds spent inside intervals `add`ed (monotonic s), and
    the `total` seconds ever added."""

    def __init__(self, window: float):
        self.window = window
        self.total = 0.0
        self._intervals: deque[tuple[float, float]] = deque()

    def add(self, start: float, end: float) -> None:
        self._intervals.append((start, end))
        self.total += end - start

    def timed(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`function(*args, **kwargs)`, the time it ran added (also when it raised)."""
        started = time.monotonic()
        try:
            return function(*args, **kwargs)
        finally:
            self.add(started, time.monotonic())

    def share(self, now: float) -> float:
        since = now - self.window
        while self._intervals and self._intervals[0][1] <= since:
            self._intervals.popleft()
        busy = sum(end - max(start, since) for start, end in self._intervals)
        return busy / self.window
