"""One source item as the ledger records it: a file, or one ZeroMQ message."""

from __future__ import annotations

from dataclasses import dataclass


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
