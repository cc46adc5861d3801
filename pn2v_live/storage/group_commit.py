"""Durability (power cut): a ledger row commits only after its chunk file and every folder leading
to it are fsynced, so after a power cut every frame the ledger (and so the sender's status reply)
calls stored is on disk. A chunk written but not yet recorded is simply written again when its
frame is resent.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pn2v_live.storage.atomic import sync_paths
from pn2v_live.storage.ledger import Ledger


class GroupCommit:
    """Makes written chunks durable, then records them in the ledger, many frames per commit.

    A writer first fsyncs its chunk file and the folders leading to it (`sync_paths`: all at
    once, and at the same time as other writers' fsyncs, which share the disk's cache flushes),
    then hands over its ledger row and waits. A writer that finds no commit running leads one:
    it takes every row handed over so far, commits them in one transaction (`Ledger.record`,
    one WAL fsync) and wakes their writers; rows handed over meanwhile wait for the next one,
    led by one of their writers. No thread of its own. When a commit fails, each of its writers
    gets the error and its frame is not recorded.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._changed = threading.Condition()
        self._waiting: list[_Handover] = []
        self._leading = False
        self.rounds = 0  # rounds committed, and the frames they held (for tests and benches)
        self.committed = 0

    def commit(
        self,
        paths: list[Path],
        frame: tuple[str, int] | None = None,
        denoised: tuple[str, int, int, str] | None = None,
    ) -> None:
        """Return once `paths` are fsynced and then the raw `frame` (acquisition, t) or
        `denoised` row (acquisition, t, version, window) is committed; raise what made either
        fail (nothing is recorded then)."""
        sync_paths(paths)
        handover = _Handover(frame, denoised)
        with self._changed:
            self._waiting.append(handover)
            while self._leading and not handover.done:
                self._changed.wait()
            if not handover.done:
                self._leading = True
                batch, self._waiting = self._waiting, []
        if not handover.done:
            self._round(batch)
        if handover.error is not None:
            raise handover.error

    def _round(self, batch: list[_Handover]) -> None:
        error = None
        try:
            self._ledger.record(
                [h.frame for h in batch if h.frame is not None],
                [h.denoised for h in batch if h.denoised is not None],
            )
        except BaseException as caught:  # the writers see it, each for its own frame
            error = caught
        with self._changed:
            for handover in batch:
                handover.error = error
                handover.done = True
            if error is None:
                self.rounds += 1
                self.committed += len(batch)
            self._leading = False
            self._changed.notify_all()


class _Handover:
    """One frame waiting in a GroupCommit."""

    __slots__ = ("frame", "denoised", "done", "error")

    def __init__(self, frame, denoised) -> None:
        self.frame, self.denoised = frame, denoised
        self.done = False
        self.error: BaseException | None = None
