"""What a source (the folder watcher) has taken: its items and the frames each one became.

The ledger keeps one row per item (see `ledger.py`, table `items`), so a restarted source takes
each file exactly once: a pending item is stored again into the same frames, a stored one is
skipped unless it grew, a rejected one is tried again only once it changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pn2v_live.storage.ledger import Ledger


@dataclass(frozen=True)
class Item:
    """One source item: a file (key = absolute path) or a stream frame (key = "acq/index"),
    with its size, mtime, the frames [first_t, first_t + frames) it maps to and its status
    ("pending", "stored" or "rejected" with a reason)."""

    source: str
    key: str
    acquisition: str | None
    size: int | None
    mtime_ns: int | None
    first_t: int | None
    frames: int | None
    status: str
    reason: str | None


class SourceItems:
    """The items of one `source` in the store's ledger (`Store.source_items`; thread-safe)."""

    def __init__(self, ledger: Ledger, source: str) -> None:
        self._ledger = ledger
        self.source = source

    def get(self, key: str) -> Item | None:
        """The item `key`, or None when it was never seen."""
        rows = self._ledger.run(
            "SELECT * FROM items WHERE source = ? AND key = ?", (self.source, key)
        )
        return Item(*rows[0][:9]) if rows else None

    def all(self, status: str | None = None) -> list[Item]:
        """Every item of the source (optionally only those with `status`), in the order first
        seen."""
        if status is None:
            sql, params = "SELECT * FROM items WHERE source = ? ORDER BY rowid", (self.source,)
        else:
            sql = "SELECT * FROM items WHERE source = ? AND status = ? ORDER BY rowid"
            params = (self.source, status)
        return [Item(*row[:9]) for row in self._ledger.run(sql, params)]

    def reserve(self, key: str, acquisition: str, size: int, mtime_ns: int, frames: int) -> int:
        """Mark item `key` pending and give it the next free range of `frames` frames in
        `acquisition`; returns its first t.

        The range starts after every stored or pending range of the acquisition, so a restart
        re-ingests a pending item into exactly the same frames.
        """
        with self._ledger.transaction() as db:
            row = db.execute(
                "SELECT first_t FROM items WHERE source = ? AND key = ? AND status = 'pending'",
                (self.source, key),
            ).fetchone()
            if row is not None:
                return row[0]
            (used,) = db.execute(
                "SELECT max(coalesce((SELECT max(first_t + frames) FROM items "
                "WHERE acquisition = ? AND status IN ('stored', 'pending')), 0), "
                "coalesce((SELECT max(t) + 1 FROM frames WHERE acquisition = ?), 0))",
                (acquisition, acquisition),
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', NULL, ?)",
                (self.source, key, acquisition, size, mtime_ns, used, frames, time.time()),
            )
            return used

    def extend(self, key: str, frames: int, size: int, mtime_ns: int) -> bool:
        """Grow stored item `key`'s frame range to `frames` frames and mark it pending again, if
        nothing else of its acquisition (an item's range or a frame) lies after that range.

        False (and nothing changed) when something does: the added frames have no numbers.
        """
        source = self.source
        with self._ledger.transaction() as db:
            acquisition, first_t, stored = db.execute(
                "SELECT acquisition, first_t, frames FROM items WHERE source = ? AND key = ?",
                (source, key),
            ).fetchone()
            end = first_t + stored
            (later,) = db.execute(
                "SELECT (SELECT count(*) FROM items WHERE acquisition = ? AND first_t >= ? "
                "AND status IN ('stored', 'pending') AND NOT (source = ? AND key = ?)) "
                "+ (SELECT count(*) FROM frames WHERE acquisition = ? AND t >= ?)",
                (acquisition, end, source, key, acquisition, end),
            ).fetchone()
            if later:
                return False
            db.execute(
                "UPDATE items SET status = 'pending', frames = ?, size = ?, mtime_ns = ?, "
                "updated = ? WHERE source = ? AND key = ?",
                (frames, size, mtime_ns, time.time(), source, key),
            )
            return True

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
        self._ledger.run(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, 'stored', NULL, ?)",
            (self.source, key, acquisition, size, mtime_ns, first_t, frames, time.time()),
        )

    def mark_rejected(
        self,
        key: str,
        reason: str,
        acquisition: str | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Record item `key` as refused, with a human-readable reason."""
        self._ledger.run(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, NULL, NULL, 'rejected', ?, ?)",
            (self.source, key, acquisition, size, mtime_ns, reason, time.time()),
        )
