"""Which acquisitions a stage's pass looks at: only those that may still have work for it.

A store may hold thousands of acquisitions that will never change again. A pass of inference or
the trainer (every 0.1 s, 0.5 s) that listed and opened them all would slow down with each one.
A `WorkingSet` lists the store once, at its first pass, judging each acquisition by its
`Store.summary` (metadata files and ledger counts, not opening it); from then on it learns of
frames stored anywhere in the store through `Store.watch`, and drops an acquisition once it has
no frame without a denoised twin and no raw frame stored within `horizon_seconds`. A pass then
costs the acquisitions that may have work, however many closed ones the store holds. It keeps
those acquisitions open between passes (the store closes the ones nobody uses).
"""

from __future__ import annotations

import time
from collections import Counter
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
        self._working: list[Acquisition] = []  # kept open between passes
        # raw frames stored per acquisition since this set was made or `stored` was cleared
        self.stored: Counter[str] = Counter()

    def acquisitions(self) -> list[Acquisition]:
        """The acquisitions that may have work now, opened, by name (a deleted or damaged one is
        left out, see `Store.open_acquisitions`)."""
        changed = self._changes.take()
        self.stored.update(+changed)  # raw frames only (`+` drops those only denoised or closed)
        names = set(changed) | (self._listing() if self._names is None else self._names)
        present = sorted(n for n in names if (self.store.path(n) / "raw").is_dir())  # not deleted
        opened = self.store.open_acquisitions(present)
        working = [a for a in opened if a.untwinned_count or self.recent(a)]
        self._working = working
        self._names = {a.name for a in working}
        return working

    def recent(self, acquisition: Acquisition) -> bool:
        """Whether `acquisition`'s newest raw frame was stored within `horizon_seconds`."""
        return self._within(acquisition.last_frame_at)

    def _within(self, last_frame_at: float | None) -> bool:
        return last_frame_at is not None and time.time() - last_frame_at < self.horizon_seconds

    def _listing(self) -> set[str]:
        """The store's acquisitions that may have work, from their summaries (not opening
        them)."""
        summaries = (self.store.summary(name) for name in self.store.acquisitions())
        return {
            summary.name
            for summary in summaries
            if summary is not None and (summary.untwinned or self._within(summary.last_frame_at))
        }
