"""A feed of store changes: which acquisitions were given raw or denoised frames or closed since a
reader last looked (`Store.watch`), so stages and the viewer learn of new frames without listing
the store."""

from __future__ import annotations

import threading
from collections import Counter


class Changes:
    """The acquisitions given raw or denoised frames or closed since the last `take`, with how
    many raw frames each was given (thread-safe)."""

    def __init__(self) -> None:
        self._frames: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, frames: int) -> None:
        with self._lock:
            self._frames[name] += frames

    def take(self) -> Counter[str]:
        """{name: raw frames stored} of the acquisitions changed since the last call (0 for one
        only given denoised frames or closed)."""
        with self._lock:
            frames, self._frames = self._frames, Counter()
        return frames
