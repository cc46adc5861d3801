"""The viewer's list of acquisitions, kept current at the cost of what changed.

Each open viewer polls the list (its live view every 0.25 s), and a facility store holds
thousands of old acquisitions. The list never opens an acquisition: it lists the store folder
again only when the folder changed (its modification time), summarises each acquisition once
from its metadata files and ledger counts (`Store.summary`), and again only when the store
reports it given raw or denoised frames or closed (`Store.watch`). It keeps a small summary
dict per acquisition; the viewer opens an acquisition when a page asks for its frames.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from pn2v_live.storage.store import Store
from pn2v_live.storage.summary import Summary

RACY_NS = 1_000_000_000  # a listing this young may have missed a change within the same tick


class AcquisitionList:
    """The summaries (`show(summary)`, a JSON-able dict) of the acquisitions of `store`, by
    name; thread-safe."""

    def __init__(self, store: Store, show: Callable[[Summary], dict]) -> None:
        self.store, self.show = store, show
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
        """The summary of every acquisition that can be read, by name."""
        with self._lock:
            changed = self._changes.take()
            summaries = {}
            for name in self.names():
                shown = self._summaries.get(name)
                if shown is None or name in changed:
                    summary = self.store.summary(name)
                    shown = None if summary is None else self.show(summary)
                if shown is not None:
                    summaries[name] = shown
            self._summaries = summaries
            return list(summaries.values())
