"""The viewer's list of acquisitions, kept current at the cost of what changed.

Each open viewer polls the list (its live view every 0.25 s). Listing the store folder and
summarising every acquisition each time would take a store of 10,000 acquisitions most of a
core. Instead the folder is listed again only when it changed (its modification time), and an
acquisition is summarised again only while frames of it wait for a denoised twin, or when the
store reports it given frames or closed (`Store.watch`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.store import Store

RACY_NS = 1_000_000_000  # a listing this young may have missed a change within the same tick


class AcquisitionList:
    """Summaries (`summarise(acquisition)`, a dict with "lag": frames without a twin) of the
    acquisitions of `store`, by name; thread-safe."""

    def __init__(self, store: Store, summarise: Callable[[Acquisition], dict]) -> None:
        self.store, self.summarise = store, summarise
        self._changes = store.watch()
        self._listed: tuple[int, list[str]] | None = None  # (folder mtime in ns, names)
        self._summaries: dict[str, dict] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every acquisition's name, sorted (`Store.acquisitions`); one stat while the store
        folder is unchanged."""
        stamp = os.stat(self.store.root).st_mtime_ns
        listed = self._listed
        if listed is not None and listed[0] == stamp and time.time_ns() - stamp > RACY_NS:
            return listed[1]
        names = self.store.acquisitions()
        self._listed = stamp, names
        return names

    def summaries(self) -> list[dict]:
        """The summary of every acquisition that opens, by name."""
        with self._lock:
            changed = self._changes.take()
            names = self.names()
            stale = [
                name for name in names
                if name in changed or self._summaries.get(name, {"lag": 1})["lag"]
            ]  # fmt: skip
            fresh = {a.name: self.summarise(a) for a in self.store.open_acquisitions(stale)}
            self._summaries = {
                name: summary
                for name in names
                if (summary := fresh.get(name, self._summaries.get(name))) is not None
            }
            return list(self._summaries.values())
