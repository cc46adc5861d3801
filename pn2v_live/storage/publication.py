"""When stored raw frames become visible to readers of the acquisition's metadata.

A frame counts as stored once its ledger row exists, but readers in other processes (napari,
the viewer, dask) go by the group's `valid_t` and the arrays' length. Rewriting that metadata
after every frame would cost a file write per frame, so `Publication` writes `valid_t` of every
acquisition given frames at most every PUBLISH_SECONDS while frames arrive, and trims the arrays
to their exact length when the store settles (`Store.settle`: the ingest sources call it when
they fall idle). A metadata write that fails (disk full) leaves its acquisition pending for the
next; its first failure and its recovery are logged, not every retry.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)

PUBLISH_SECONDS = 0.25  # under load, valid_t on disk lags the stored frames by at most this


class Flushable(Protocol):
    """What `Publication` needs of an acquisition (`Acquisition.flush`)."""

    name: str

    def flush(self, trim: bool = True) -> bool: ...


class Publication:
    """The acquisitions given raw frames since their arrays were last trimmed (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[Flushable] = set()
        self._published = 0.0  # monotonic time of the last publication
        self._failing: set[str] = set()  # acquisitions whose metadata write fails now

    def stored(self, acquisition: Flushable) -> None:
        """A raw frame of `acquisition` was stored: publish every pending acquisition's
        `valid_t` when the last publication is PUBLISH_SECONDS old."""
        with self._lock:
            self._pending.add(acquisition)
            due = time.monotonic() - self._published > PUBLISH_SECONDS
        if due:
            self.publish(trim=False)

    def publish(self, trim: bool) -> dict[str, Exception]:
        """Write `valid_t` of every pending acquisition and, with `trim`, cut its arrays to
        their exact length (then it is no longer pending); returns the errors of those whose
        write failed, by name (they stay pending)."""
        with self._lock:
            self._published = time.monotonic()
            pending = list(self._pending)
            if trim:
                self._pending = set()
        failed: dict[str, Exception] = {}
        for acquisition in pending:
            name = acquisition.name
            try:
                acquisition.flush(trim=trim)
            except Exception as error:
                failed[name] = error
                with self._lock:
                    self._pending.add(acquisition)
                    first = name not in self._failing
                    self._failing.add(name)
                if first:
                    log.error("could not write the metadata of %s, retrying: %s", name, error)
                continue
            with self._lock:
                recovered = name in self._failing
                self._failing.discard(name)
            if recovered:
                log.info("metadata of %s written again", name)
        return failed
