"""Which acquisitions a stage's pass looks at: only those that may still have work for it.

A store may hold thousands of acquisitions that will never change again. A pass of inference or
the trainer (every 0.1 s, 0.5 s) that listed and opened them all would slow down with each one.
A `WorkingSet` lists the store once, at its first pass, judging each acquisition from its
metadata file and one ledger query for all (not opening it); from then on it learns of frames
stored anywhere in the store through `Store.watch`, and drops an acquisition once it has no
frame without a denoised twin and no raw frame stored within `horizon_seconds`. A pass then
costs the acquisitions that may have work, however many closed ones the store holds.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pn2v_live.storage.acquisition import Acquisition
    from pn2v_live.storage.store import Store


class WorkingSet:
    """The acquisitions of `store` with frames waiting for a denoised twin, or with a raw frame
    stored within the last `horizon_seconds` (back-fill, training rounds)."""

    def __init__(self, store: Store, horizon_seconds: float) -> None:
        self.store = store
        self.horizon_seconds = horizon_seconds
        self._changes = store.watch()
        self._names: set[str] | None = None  # None until the first pass lists the store
        # raw frames stored per acquisition since this set was made or `stored` was cleared
        self.stored: Counter[str] = Counter()

    def acquisitions(self) -> list[Acquisition]:
        """The acquisitions that may have work now, opened, by name (a deleted or damaged one is
        left out, see `Store.open_acquisitions`)."""
        changed = self._changes.take()
        self.stored.update(changed)
        names = set(changed) | (self._listing() if self._names is None else self._names)
        present = sorted(n for n in names if (self.store.path(n) / "raw").is_dir())  # not deleted
        opened = self.store.open_acquisitions(present)
        working = [a for a in opened if a.untwinned_count or self.recent(a)]
        self._names = {a.name for a in working}
        return working

    def recent(self, acquisition: Acquisition) -> bool:
        """Whether `acquisition`'s newest raw frame was stored within `horizon_seconds`."""
        return self._within(acquisition.last_frame_at)

    def _within(self, last_frame_at: float | None) -> bool:
        return last_frame_at is not None and time.time() - last_frame_at < self.horizon_seconds

    def _listing(self) -> set[str]:
        """The store's acquisitions that may have work, from their metadata files and the
        ledger, without opening them."""
        waiting = self.store.acquisitions_without_twins()
        return {
            name
            for name in self.store.acquisitions()
            if name in waiting or self._within(last_frame_at(self.store.path(name)))
        }


def last_frame_at(path: Path) -> float | None:
    """The unix time (s) the newest raw frame of the acquisition at `path` was stored, from its
    group's attributes file (Zarr format 2 or 3) alone; None when unknown or unreadable."""
    for name in (".zattrs", "zarr.json"):
        try:
            document = json.loads((path / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return None
        attributes = document.get("attributes", {}) if name == "zarr.json" else document
        value = attributes.get("pn2v_live", {}).get("last_frame_at")
        return float(value) if isinstance(value, int | float) else None
    return None
