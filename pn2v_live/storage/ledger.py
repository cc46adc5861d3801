"""The ingest ledger: one SQLite database (WAL mode) per data root recording what is stored.

Three tables:

- `frames(acquisition, t)`: a raw frame counts as stored once its row exists. The store writes
  the chunk and fsyncs it and its folders first, and commits this row second (`record`, many
  frames per transaction), so a crash or power cut between the two leaves an unrecorded chunk
  that the next delivery of the same frame simply overwrites, never a row without its chunk.
- `items(source, key, ...)`: every source item (a file, or one ZeroMQ message identified by
  acquisition and index) with its size, mtime, the frame range it maps to and its status:
  `pending` (frame range reserved, being written), `stored`, or `rejected` with a reason.
- `denoised(acquisition, t, version, window)`: which model version produced each denoised frame,
  and which frames around it that model saw ("before:after" t; "2:0" is a live twin that the
  back-fill refines to "2:2" once the later frames are stored).

Durability: `record` commits with `synchronous=FULL` (the WAL is fsynced before it returns);
every other write commits with `synchronous=NORMAL` (durable at the next `record` or
checkpoint; the WAL is append-only, so a power cut can only lose the newest commits, never one
before a `record` that survived). Losing such a commit is harmless: a pending item is
ingested again into the same frames, a `stored` mark follows from a pending one.

All methods are thread-safe (one connection behind a lock). The `items` rows are read and
written through `source_items.SourceItems`.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LEDGER_FILE = "ingest-ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    acquisition TEXT NOT NULL,
    t INTEGER NOT NULL,
    PRIMARY KEY (acquisition, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS items (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    acquisition TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    first_t INTEGER,
    frames INTEGER,
    status TEXT NOT NULL CHECK (status IN ('pending', 'stored', 'rejected')),
    reason TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS denoised (
    acquisition TEXT NOT NULL,
    t INTEGER NOT NULL,
    version INTEGER NOT NULL,
    window TEXT NOT NULL DEFAULT '0:0',
    PRIMARY KEY (acquisition, t)
) WITHOUT ROWID;
"""
# Ledgers written before temporal context lack the window column: their twins are single-frame.
_ADD_WINDOW = "ALTER TABLE denoised ADD COLUMN window TEXT NOT NULL DEFAULT '0:0'"


class Ledger:
    """The SQLite ledger at `<root>/ingest-ledger.sqlite` (created on first use)."""

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LEDGER_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a process crash loses nothing, a power cut at most the last
        # commits; `record` (stored and denoised frames) switches to FULL for its transaction.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(denoised)")}
        if "window" not in columns:
            self._db.execute(_ADD_WINDOW)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def run(self, sql: str, params: tuple = ()) -> list[tuple]:
        """The rows of one SQL statement, committed at once (`synchronous=NORMAL`)."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one write transaction (BEGIN IMMEDIATE: no other writer until
        it commits on leaving, or rolls back on an error), under the ledger's lock."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self._db

    # frames -----------------------------------------------------------------------------

    def record(
        self,
        frames: Sequence[tuple[str, int]] = (),
        denoised: Sequence[tuple[str, int, int, str]] = (),
    ) -> None:
        """Record stored raw frames (acquisition, t) and denoised frames (acquisition, t, model
        version, window) in one transaction, on disk (WAL fsynced) when this returns.

        Call only once their chunks and folders are fsynced (the store's group commit does).
        """
        with self._lock:
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany("INSERT OR IGNORE INTO frames VALUES (?, ?)", frames)
                    self._db.executemany(
                        "INSERT OR REPLACE INTO denoised VALUES (?, ?, ?, ?)", denoised
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def add_frame(self, acquisition: str, t: int) -> None:
        """Record raw frame `t` of `acquisition` as stored (call after its chunk is on disk)."""
        self.record(frames=[(acquisition, t)])

    def forget_frames(self, acquisition: str, ts: list[int]) -> None:
        """Drop the rows of frames whose raw chunks turned out to be missing (reconciliation),
        with their denoised versions: a frame stored again must be denoised again."""
        rows = [(acquisition, t) for t in ts]
        with self._lock, self._db:
            self._db.executemany("DELETE FROM frames WHERE acquisition = ? AND t = ?", rows)
            self._db.executemany("DELETE FROM denoised WHERE acquisition = ? AND t = ?", rows)

    def forget_acquisition(self, acquisition: str) -> int:
        """Drop every row of `acquisition` (its folder is gone); returns how many there were."""
        with self._lock, self._db:
            return sum(
                self._db.execute(
                    f"DELETE FROM {table} WHERE acquisition = ?", (acquisition,)
                ).rowcount
                for table in ("frames", "denoised", "items")
            )

    def length(self, acquisition: str) -> int:
        """One past the last stored raw frame of `acquisition` (0 when none is stored)."""
        rows = self.run("SELECT max(t) FROM frames WHERE acquisition = ?", (acquisition,))
        return 0 if rows[0][0] is None else rows[0][0] + 1

    def counts(self, acquisition: str) -> tuple[int, int]:
        """(stored raw frames, denoised frames) of `acquisition`."""
        rows = self.run(
            "SELECT (SELECT count(*) FROM frames WHERE acquisition = ?), "
            "(SELECT count(*) FROM denoised WHERE acquisition = ?)",
            (acquisition, acquisition),
        )
        return rows[0][0], rows[0][1]

    def frames(self, acquisition: str) -> list[int]:
        """Indices of the stored raw frames of `acquisition`, ascending."""
        rows = self.run("SELECT t FROM frames WHERE acquisition = ? ORDER BY t", (acquisition,))
        return [t for (t,) in rows]

    # denoised versions ------------------------------------------------------------------

    def set_denoised(self, acquisition: str, t: int, version: int, window: str = "0:0") -> None:
        """Record that denoised frame `t` was written by model `version` seeing the frames
        `window` ("before:after") around it (after its chunk is on disk)."""
        self.record(denoised=[(acquisition, t, version, window)])

    def denoised_twins(self, acquisition: str) -> dict[int, tuple[int, str]]:
        """{t: (model version, window)} of every denoised frame of `acquisition`."""
        rows = self.run(
            "SELECT t, version, window FROM denoised WHERE acquisition = ?", (acquisition,)
        )
        return {t: (version, window) for t, version, window in rows}
