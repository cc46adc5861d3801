"""Folder ingest: TIFF / OME-TIFF files appearing under watched folders become stored frames.

Each watched folder holds one sub-folder per acquisition (`<watched>/<acquisition>/*.tif`, the
default `pattern`); files are taken in natural name order, each page one frame. A file is taken
once it is complete: closed after writing (inotify close-write, local disks) with its size and
mtime unchanged since, or unchanged for `stable_seconds` (always the rule with `polling=True`,
for network shares where no events arrive). A rescan every `rescan_seconds` compares the folders
with the ledger and picks up whatever the events missed, and the files of an interrupted run.

Source files are only ever opened for reading, each on its own: a file of a multi-file OME-TIFF
set contributes its own pages (a BinaryOnly file of the set takes its channel and z-plane
counts from the set's metadata file beside it). Empty, non-TIFF, truncated or inconsistent
files (other frame shape or dtype than their acquisition, several channels or z-planes per
frame) are rejected with a reason in the ledger, a log line and a metric; a rejected file
that changes later is tried again. A stored file that grows (a time-lapse written page by page)
has its added pages stored after its frames; one that changes otherwise is counted as rejected
(`changed`) and its stored frames are kept. A file that cannot be opened or stored now
(permissions, a share lock) is logged (at its 1st, 2nd, 4th, ... try) and tried again at every
rescan, while the files after it are taken; a full disk pauses the source instead (see
`Stage`: backing off from 1 s to 5 min, at once when space is freed) and the files wait.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from pn2v_live.errors import UserError
from pn2v_live.pipeline.folder_layout import DEFAULT_PATTERN, SUFFIXES, compile_pattern, natural_key
from pn2v_live.pipeline.ingest import ingested, reject
from pn2v_live.pipeline.stage import Liveness, Stage, failure_reason, thread_liveness
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.layout import validate_name
from pn2v_live.storage.rejected import FrameCheck, Rejected
from pn2v_live.storage.source_items import Item
from pn2v_live.storage.store import Store
from pn2v_live.storage.tiff_metadata import ImageMetadata
from pn2v_live.storage.tiff_reader import TiffRefused, read_tiff
from pn2v_live.telemetry import STAGE_FAILURES

log = logging.getLogger(__name__)

SOURCE = "folder"


@dataclass
class _Candidate:
    """A file seen but not yet taken: its last stat, since when unchanged, stat when closed."""

    root: Path
    stat: tuple[int, int]
    since: float
    closed_stat: tuple[int, int] | None = None


class _Events(FileSystemEventHandler):
    def __init__(self, source: FolderSource, root: Path) -> None:
        self.source, self.root = source, root

    def on_created(self, event: FileSystemEvent) -> None:
        self.source.notice(self.root, event.src_path)

    on_modified = on_created

    def on_moved(self, event: FileSystemEvent) -> None:
        self.source.notice(self.root, event.dest_path)

    def on_closed(self, event: FileSystemEvent) -> None:
        self.source.notice(self.root, event.src_path, closed=True)


class FolderSource(Stage):
    """Watches `paths` and stores every complete TIFF under them exactly once."""

    def __init__(
        self,
        store: Store,
        paths: list[Path] | Path,
        polling: bool = False,
        stable_seconds: float = 2.0,
        rescan_seconds: float = 10.0,
        pattern: str = DEFAULT_PATTERN,
        check: FrameCheck | None = None,  # refuses frames it cannot denoise (camera maps)
    ) -> None:
        super().__init__("folder-source", idle_seconds=0.1, disk_path=store.root)
        self.store, self.check = store, check
        self.items = store.source_items(SOURCE)  # the files taken, and their frames
        self.roots = [Path(p).resolve() for p in ([paths] if isinstance(paths, Path) else paths)]
        self.polling = polling
        self.stable_seconds = stable_seconds
        self.rescan_seconds = rescan_seconds
        self.pattern = compile_pattern(pattern)
        self._candidates: dict[str, _Candidate] = {}
        self._lock = threading.Lock()
        self._observer = None
        self._next_rescan = 0.0
        self._failing_files: dict[str, int] = {}  # path → failed tries, until it is taken
        self.counts = {"stored_files": 0, "stored_frames": 0, "rejected_files": 0}

    # lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Check the folders exist, start the observer and the worker thread."""
        for root in self.roots:
            if not root.is_dir():
                raise UserError(f"watched folder {root} does not exist; create it or fix the path")
        self._observer = PollingObserver(timeout=1) if self.polling else Observer()
        for root in self.roots:
            self._observer.schedule(_Events(self, root), str(root), recursive=True)
        self._observer.start()
        self._next_rescan = 0.0  # first work() scans everything: interrupted run, grown files
        super().start()
        log.info(
            "watching %s (%s)",
            ", ".join(map(str, self.roots)),
            "polling" if self.polling else "events",
        )

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop watching; the file being stored is finished first."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None
        return super().stop(timeout)

    def health_reports(self, max_silence: float) -> list[Liveness]:
        """The liveness of the worker and of the observer's thread that reports file events."""
        events = thread_liveness("folder-events", self._observer)
        return [*super().health_reports(max_silence), events]

    def health(self) -> dict:
        with self._lock:
            waiting = len(self._candidates)
        running = self._thread is not None and self._thread.is_alive()
        return {
            "state": "running" if running else "stopped",
            "waiting_files": waiting,
            **self.counts,
            "last_error": self.last_error,
        }

    # events -----------------------------------------------------------------------------

    def notice(self, root: Path, path: str | bytes, closed: bool = False) -> None:
        """Remember a file that may be new or changed (called from the observer thread)."""
        path = os.fsdecode(path)
        name = os.path.basename(path)
        if not name.lower().endswith(SUFFIXES) or name.startswith((".", "~")):
            return
        try:
            stat = _stat(path)
        except OSError:
            return
        now = time.monotonic()
        with self._lock:
            candidate = self._candidates.get(path)
            if candidate is None:
                candidate = self._candidates[path] = _Candidate(root, stat, now)
            elif candidate.stat != stat:
                candidate.stat, candidate.since = stat, now
            if closed:
                candidate.closed_stat = stat

    # worker -----------------------------------------------------------------------------

    def work(self) -> bool:
        """Store every file that became ready; rescan the folders when due."""
        if time.monotonic() >= self._next_rescan:
            self.rescan(check_stored=self._next_rescan == 0.0)
            self._next_rescan = time.monotonic() + self.rescan_seconds
        ready = self._ready()
        for n, (path, candidate) in enumerate(ready):
            if self.stopping:
                break
            try:
                self._ingest(Path(path), candidate)
            except Exception as error:  # unreadable or unwritable now: the others go on
                if failure_reason(error) == "disk_full":  # so would the others: pause
                    self._requeue(ready[n:])
                    raise
                self._file_failed(path, error)
            else:
                self._file_taken(path)
            self.beat()  # a long backlog is progress, not a hang
        failed = self.store.settle()
        if failed:  # a full disk pauses the source, as a frame's write would
            raise next(iter(failed.values()))
        return bool(ready)

    def _file_failed(self, path: str, error: Exception) -> None:
        """Count a file that cannot be taken now (it is tried again at the next rescan); its
        1st, 2nd, 4th, 8th, ... failure is logged, with a traceback only for a bug."""
        self.failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        reason = failure_reason(error)
        STAGE_FAILURES.labels(self.name, reason).inc()
        count = self._failing_files[path] = self._failing_files.get(path, 0) + 1
        if count & (count - 1) == 0:
            log.warning(
                "cannot take %s now (%s: %s); trying again at every rescan (%d tries so far)",
                path,
                reason,
                self.last_error,
                count,
                exc_info=count == 1 and not isinstance(error, OSError),  # a traceback: a bug
            )

    def _file_taken(self, path: str) -> None:
        """A file that failed before was taken (or found already stored) now."""
        tries = self._failing_files.pop(path, None)
        if tries is not None:
            log.info("took %s after %d failed tries", path, tries)

    def _requeue(self, items: list[tuple[str, _Candidate]]) -> None:
        """Put ready files back in the waiting set, to be taken after a pause."""
        with self._lock:
            for path, candidate in items:
                self._candidates.setdefault(path, candidate)

    def rescan(self, check_stored: bool = False) -> None:
        """Queue every TIFF under the roots that the ledger does not hold as stored, nor as
        rejected with the same size and mtime. `check_stored` (the first scan after a start)
        also queues stored files whose size or mtime changed: stacks that grew meanwhile."""
        known = {item.key: item for item in self.items.all()}
        for root in self.roots:
            for folder, _, files in os.walk(root):
                self.beat()
                for name in files:
                    path = os.path.join(folder, name)
                    item = known.get(path)
                    if item is not None and item.status == "stored" and not check_stored:
                        continue
                    if item is not None and item.status in ("stored", "rejected"):
                        try:
                            if (item.size, item.mtime_ns) == _stat(path):
                                continue
                        except OSError:
                            continue
                    self.notice(root, path)

    def _ready(self) -> list[tuple[str, _Candidate]]:
        """Complete candidates, removed from the waiting set, in natural name order.

        Frames are numbered in the order files are taken, so a file also waits while an
        earlier-named file in its folder is still incomplete.
        """
        now, wall = time.monotonic(), time.time()
        complete, waiting = [], {}
        with self._lock:
            for path, candidate in list(self._candidates.items()):
                try:
                    stat = _stat(path)
                except OSError:
                    del self._candidates[path]
                    self._failing_files.pop(path, None)  # gone: no longer failing
                    continue
                if stat != candidate.stat:
                    candidate.stat, candidate.since = stat, now
                closed = candidate.closed_stat == stat and not self.polling
                stable = now - candidate.since >= self.stable_seconds
                old = wall - stat[1] / 1e9 >= self.stable_seconds  # untouched before we looked
                if closed or stable or old:
                    complete.append(path)
                else:
                    folder = os.path.dirname(path)
                    key = natural_key(path)
                    waiting[folder] = min(waiting.get(folder, key), key)
            ready = [
                (path, self._candidates.pop(path))
                for path in complete
                if os.path.dirname(path) not in waiting
                or natural_key(path) < waiting[os.path.dirname(path)]
            ]
        return sorted(ready, key=lambda item: natural_key(item[0]))

    def _ingest(self, path: Path, candidate: _Candidate) -> None:
        key = str(path)
        size, mtime_ns = candidate.stat
        previous = self.items.get(key)
        grown = previous is not None and previous.status == "stored"
        if grown and (previous.size, previous.mtime_ns) == (size, mtime_ns):
            return
        name = None
        try:
            name = self._acquisition_name(path, candidate.root)
            frames, metadata = _read_frames(path)
            acquisition = self.store.acquisition_for(
                name,
                frames.shape[1:],
                frames.dtype,
                metadata.physical,
                metadata.sensor_origin,  # Micro-Manager's ROI: selects the camera maps' region
                check=self.check,
            )
            if grown:
                first_t, done = self._extend(acquisition, previous, frames, size, mtime_ns)
            else:
                first_t, done = self.items.reserve(key, name, size, mtime_ns, len(frames)), 0
            for offset in range(done, len(frames)):
                if acquisition.put_raw(first_t + offset, frames[offset]) == "stored":
                    ingested(SOURCE)
            self.items.mark_stored(key, name, first_t, len(frames), size, mtime_ns)
        except Rejected as error:
            if grown:  # its stored frames stay on record; tried again when it changes again
                self.items.mark_stored(key, previous.acquisition, previous.first_t,
                                       previous.frames, size, mtime_ns)  # fmt: skip
            else:
                self.items.mark_rejected(key, f"{error.reason}: {error}", name, size, mtime_ns)
            reject(SOURCE, error, str(path))
            self.counts["rejected_files"] += 1
            return
        self.counts["stored_files"] += not grown
        self.counts["stored_frames"] += len(frames) - done
        log.debug("%s → %s frames %d..%d", path, name, first_t + done, first_t + len(frames) - 1)

    def _extend(
        self, acquisition: Acquisition, item: Item, frames: np.ndarray, size: int, mtime_ns: int
    ) -> tuple[int, int]:
        """(first t, pages already stored) of a stored file that changed: a stack that grows,
        e.g. a time-lapse written page by page. Raises Rejected("changed") when it changed
        otherwise, or when other frames already follow its own in the acquisition."""
        stored = item.frames
        if len(frames) <= stored or not all(
            _is_stored(acquisition, item.first_t + page, frames[page]) for page in (0, stored - 1)
        ):
            raise Rejected(
                "changed",
                f"changed after its {stored} frame(s) were stored, not only by pages added at "
                "the end; the stored frames are kept (save changed data as a new file)",
            )
        if not self.items.extend(item.key, len(frames), size, mtime_ns):
            raise Rejected(
                "changed",
                f"grew by {len(frames) - stored} page(s) after other frames followed its own in "
                f"{acquisition.name!r}; the added pages have no frame numbers and are not stored "
                "(write one growing file per acquisition)",
            )
        return item.first_t, stored

    def _acquisition_name(self, path: Path, root: Path) -> str:
        relative = path.relative_to(root).as_posix()
        match = self.pattern.fullmatch(relative)
        if match is None:
            raise Rejected(
                "pattern",
                f"{relative} is not inside an acquisition folder (pattern {self.pattern.pattern})",
            )
        try:
            return validate_name(match["acquisition"])
        except ValueError as error:
            raise Rejected("name", str(error)) from error


def _read_frames(path: Path) -> tuple[np.ndarray, ImageMetadata]:
    """The frames (T, Y, X) of a complete TIFF and their metadata (`read_tiff`, strict);
    Rejected saying why not."""
    try:
        return read_tiff(path, strict=True)
    except TiffRefused as refused:
        raise Rejected(refused.reason, str(refused)) from None


def _is_stored(acquisition: Acquisition, t: int, pixels: np.ndarray) -> bool:
    """Whether raw frame `t` of `acquisition` is stored with exactly these pixels."""
    try:
        return np.array_equal(acquisition.read_raw(t), pixels)
    except KeyError:
        return False


def _stat(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of `path`."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns
