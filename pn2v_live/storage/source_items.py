"""What a source (the folder watcher) has taken: its items and the frames each one became.

The ledger keeps one row per item (see `ledger.py`, table `items`), so a restarted source takes
each file exactly once: a pending item is stored again into the same frames, a stored one is
skipped unless it grew, a rejected one is tried again only once it changes.
"""

from __future__ import annotations

from pn2v_live.storage.ledger import Ledger
from pn2v_live.storage.source_item import Item


class SourceItems:
    """The items of one `source` in the store's ledger (`Store.source_items`; thread-safe)."""

    def __init__(self, ledger: Ledger, source: str) -> None:
        self._ledger = ledger
        self.source = source

    def get(self, key: str) -> Item | None:
        """The item `key`, or None when it was never seen."""
        return self._ledger.item(self.source, key)

    def all(self) -> list[Item]:
        """Every item of the source, in the order first seen."""
        return self._ledger.items(self.source)

    def reserve(self, key: str, acquisition: str, size: int, mtime_ns: int, frames: int) -> int:
        """Mark item `key` pending and give it the next free range of `frames` frames in
        `acquisition`; returns its first t (the same one again after a restart)."""
        return self._ledger.reserve(self.source, key, acquisition, size, mtime_ns, frames)

    def extend(self, key: str, frames: int, size: int, mtime_ns: int) -> bool:
        """Grow a stored item's range to `frames` frames and mark it pending again; False (and
        nothing changed) when other frames of its acquisition already follow its range."""
        return self._ledger.extend(self.source, key, frames, size, mtime_ns)

    def mark_stored(
        self,
        key: str,
        acquisition: str,
        first_t: int,
        frames: int,
        size: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Record item `key` whose frames [first_t, first_t + frames) are all stored."""
        self._ledger.mark_stored(self.source, key, acquisition, first_t, frames, size, mtime_ns)

    def mark_rejected(
        self,
        key: str,
        reason: str,
        acquisition: str | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Record item `key` as refused, with a human-readable reason."""
        self._ledger.mark_rejected(self.source, key, reason, acquisition, size, mtime_ns)
