"""The acquisition store: every acquisition under one data root (`layout.py`), plus their ledger.

`Store` opens and creates acquisitions (`Acquisition`), stores each raw frame exactly once
(`put_raw`), publishes what is stored to readers (`settle`) and answers what the ledger records.

An acquisition stays open (in memory, see `Acquisition`) while anything in the process uses it
and while it is among the KEEP_OPEN most recently asked for; the others are closed, so memory
does not grow with the number of old acquisitions a viewer or a pass has looked at. There is
never more than one open `Acquisition` per name. `summary` answers the counts of one without
opening it.

One process writes a data root at a time: `Store(root, writer=True)` (ingest, serve) holds an
exclusive lock on `<root>/writer.lock` and refuses to open while another process holds it. Only the
writer removes the temporary chunk files (`*.partial`) a killed writer left behind; other processes
(calibrate, viewers) open the store without touching them.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from pn2v_live.errors import UserError
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.atomic import make_folders
from pn2v_live.storage.changes import Changes
from pn2v_live.storage.group_commit import GroupCommit
from pn2v_live.storage.layout import (
    IMAGES,
    RAW_DTYPES,
    SUFFIX,
    array_length,
    create_group,
    validate_name,
)
from pn2v_live.storage.ledger import LEDGER_FILE, Ledger
from pn2v_live.storage.physical import Physical
from pn2v_live.storage.publication import Publication
from pn2v_live.storage.rejected import FrameCheck, Rejected
from pn2v_live.storage.source_items import SourceItems
from pn2v_live.storage.summary import Summary, of_acquisition, read_summary

log = logging.getLogger(__name__)

WRITER_LOCK = "writer.lock"
KEEP_OPEN = 8  # acquisitions kept open when nothing else uses them, the most recently asked for


class Store:
    """All acquisitions under one data root, plus their ledger."""

    def __init__(self, root: str | Path, zarr_format: int = 2, *, writer: bool = False) -> None:
        """Open (or create) the data root. `writer=True` makes this process the root's one writer:
        UserError when another process already is."""
        if zarr_format not in (2, 3):
            raise ValueError(f"zarr_format must be 2 or 3, got {zarr_format}")
        self.root = make_folders(root)
        self.zarr_format = zarr_format
        self.writer = writer
        self._writer_lock = _lock_writer(self.root) if writer else None
        self._ledger = Ledger(self.root)
        self.committer = GroupCommit(self._ledger)
        self._publication = Publication()
        self._lock = threading.Lock()
        # Open acquisitions: each while in use anywhere (weak), the KEEP_OPEN most recently
        # asked for (`_recent`), and for a store that is not the writer those it wrote to,
        # until `close` trims them (`_written`).
        self._open: weakref.WeakValueDictionary[str, Acquisition] = weakref.WeakValueDictionary()
        self._recent: OrderedDict[str, Acquisition] = OrderedDict()
        self._written: dict[str, Acquisition] = {}
        self._unopenable: set[str] = set()  # acquisitions already logged as damaged
        self._renewals: Counter[str] = Counter()  # names re-used after their folder was deleted
        self._watchers: list[Changes] = []

    def close(self) -> None:
        """Flush the acquisitions this process wrote raw frames to (the writer: trim every
        acquisition to its stored frames, see `trim_all`), close the ledger and give up the
        writer lock."""
        if self.writer:
            self.trim_all()
        else:
            with self._lock:
                for acquisition in list(self._open.values()):
                    if acquisition.wrote:
                        acquisition.flush()
        self._ledger.close()
        if self._writer_lock is not None:
            os.close(self._writer_lock)  # closing the descriptor releases the lock
            self._writer_lock = None

    def trim_all(self) -> int:
        """Flush every acquisition and make its arrays (raw and denoised) exactly as long as
        its stored frames, also one grown before a crash and not opened since (the store's
        writer calls this when it closes); returns how many were trimmed. An acquisition not
        open here costs two small metadata reads and one ledger query unless it needs a trim.
        One that cannot be trimmed (damaged, disk full) is logged and left as it is."""
        trimmed = 0
        for name in self.acquisitions():
            with self._lock:
                acquisition = self._open.get(name)
            try:
                if acquisition is None:
                    length = self._ledger.length(name)
                    arrays = [self.path(name) / image / "0" for image in IMAGES]
                    if all(array_length(array) == length for array in arrays):
                        continue
                    acquisition = self.acquisition(name)  # a writer trims it on opening
                    trimmed += int(self.writer)
                trimmed += acquisition.flush()
            except Exception as error:  # zarr, JSON and OS errors: the others still get trimmed
                log.error("could not trim acquisition %s to its stored frames: %s: %s",
                          name, type(error).__name__, error)  # fmt: skip
        if trimmed:
            log.info("trimmed %d acquisition(s) to their stored frames", trimmed)
        return trimmed

    def acquisitions(self) -> list[str]:
        """Names of all acquisitions under the root, sorted."""
        names = (p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}"))
        return sorted(n for n in names if (self.root / (n + SUFFIX) / "raw").is_dir())

    def source_items(self, source: str) -> SourceItems:
        """What `source` (e.g. "folder") has taken: its items and their frames, in the ledger."""
        return SourceItems(self._ledger, source)

    def recorded_frames(self, name: str) -> list[int]:
        """The stored raw frames of acquisition `name` as the ledger has them now (also those
        another process stored since this store was opened), ascending."""
        return self._ledger.frames(name)

    def recorded_twins(self, name: str) -> dict[int, tuple[int, str]]:
        """{t: (model version, window)} of the denoised frames of acquisition `name` as the
        ledger has them now (also those another process wrote since this store was opened)."""
        return self._ledger.denoised_twins(name)

    def watch(self) -> Changes:
        """A feed of the names of acquisitions given raw or denoised frames or closed from now
        on (`WorkingSet`, the viewer's `AcquisitionList`)."""
        with self._lock:
            self._watchers.append(Changes())
            return self._watchers[-1]

    def _notify_watchers(self, name: str, frames: int) -> None:
        for changes in self._watchers:
            changes.add(name, frames)

    @property
    def open_count(self) -> int:
        """How many acquisitions are open in this process now (module docstring)."""
        with self._lock:
            return len(self._open)

    def summary(self, name: str) -> Summary | None:
        """The counts of acquisition `name` (`summary.Summary`): from memory when it is open,
        else from its metadata files and the ledger, without opening it; None when it cannot
        be read (gone; a damaged one is logged once)."""
        with self._lock:
            acquisition = self._open.get(name)
        if acquisition is not None:
            return of_acquisition(acquisition)
        try:
            return read_summary(self.path(name), name, *self._ledger.counts(name))
        except Exception as error:  # JSON and OS errors of a damaged or vanished folder
            if name not in self._unopenable:
                self._unopenable.add(name)
                log.error("cannot read acquisition %s, left alone: %s: %s",
                          name, type(error).__name__, error)  # fmt: skip
            return None

    def open_acquisitions(self, names: Iterable[str] | None = None) -> list[Acquisition]:
        """Every acquisition that opens (or those of `names`), by name; one that does not
        (damaged metadata, gone) is logged once and left out, so it never stops work on the
        others. They are not counted among the most recently asked for (the caller holds
        those it keeps working on, e.g. `WorkingSet`), so a pass does not close others'."""
        opened = []
        for name in self.acquisitions() if names is None else names:
            try:
                opened.append(self.acquisition(name, recent=False))
            except Exception as error:  # zarr, JSON and OS errors of a damaged folder
                if name not in self._unopenable:
                    self._unopenable.add(name)
                    log.error("cannot open acquisition %s, left alone: %s: %s",
                              name, type(error).__name__, error)  # fmt: skip
        return opened

    def path(self, name: str) -> Path:
        return self.root / (validate_name(name) + SUFFIX)

    def acquisition(self, name: str, *, recent: bool = True) -> Acquisition:
        """Open an existing acquisition, kept open as the most recently asked for unless
        `recent` is False (module docstring); KeyError when there is none of that name."""
        path = self.path(name)
        with self._lock:
            acquisition = self._open.get(name)
            if acquisition is not None and not (path / "raw").is_dir():
                self._let_go(acquisition)  # its folder was deleted while it was open
                acquisition = None
            if acquisition is None:
                if not (path / "raw").is_dir():
                    raise KeyError(f"no acquisition {name!r} under {self.root}")
                group = zarr.open_group(path, mode="r+")
                acquisition = Acquisition(
                    group,
                    name,
                    path,
                    self._ledger,
                    self.writer,
                    self.committer,
                    self._notify_watchers,
                    self._publication,
                    self._renewals[name],
                )
                self._open[name] = acquisition
            if recent:
                self._keep(acquisition)
            return acquisition

    def _let_go(self, acquisition: Acquisition) -> None:
        """Close an open acquisition whose folder was deleted: writes through it fail from now
        on (`Acquisition.gone`); `create` starts its name afresh (caller holds the lock)."""
        acquisition.gone = True
        for held in (self._open, self._recent, self._written):
            held.pop(acquisition.name, None)
        log.warning("%s: its folder was deleted while open; it is closed", acquisition.name)

    def _keep(self, acquisition: Acquisition) -> None:
        """Hold `acquisition` as the most recently asked for, letting go of the least recent
        beyond KEEP_OPEN (caller holds the lock)."""
        self._recent[acquisition.name] = acquisition
        self._recent.move_to_end(acquisition.name)
        while len(self._recent) > KEEP_OPEN:
            _, oldest = self._recent.popitem(last=False)
            if oldest.wrote and not self.writer:  # `close` trims it (the writer trims all)
                self._written[oldest.name] = oldest

    def put_raw(
        self,
        name: str,
        t: int,
        pixels: np.ndarray,
        *,
        physical: Physical | None = None,
        sensor_origin: tuple[int, int] | None = None,
        check: FrameCheck | None = None,
    ) -> Literal["stored", "duplicate"]:
        """Store raw frame `t` (Y, X) of acquisition `name` exactly once (`Acquisition.put_raw`),
        creating the acquisition at its first frame (`acquisition_for`, which says what the
        other arguments are); Rejected when the frame cannot be stored there."""
        acquisition = self.acquisition_for(
            name, pixels.shape, pixels.dtype, physical, sensor_origin, check
        )
        return acquisition.put_raw(t, pixels)

    def acquisition_for(
        self,
        name: str,
        frame_shape: tuple[int, ...],
        dtype: np.dtype,
        physical: Physical | None = None,
        sensor_origin: tuple[int, int] | None = None,
        check: FrameCheck | None = None,
    ) -> Acquisition:
        """The acquisition `name` for (Y, X) frames of `dtype`, created on first use; `physical`,
        the sizes the frame's source carries, go to `Acquisition.note_physical`, its
        `sensor_origin` to `Acquisition.note_sensor_origin`.

        Raises Rejected("dtype"/"shape"/"name") when the frame cannot belong to it, and what
        `check` raises for the frame at its acquisition's sensor origin (before creating
        anything).
        """
        frame_shape = tuple(frame_shape)
        if np.dtype(dtype).name not in RAW_DTYPES:
            raise Rejected(
                "dtype", f"raw frames must be {' or '.join(RAW_DTYPES)}, got {np.dtype(dtype).name}"
            )
        try:
            acquisition = self.acquisition(name)
        except KeyError:
            if check is not None:
                check(frame_shape, sensor_origin)
            try:
                acquisition = self.create(name, frame_shape, dtype, physical)
            except ValueError as error:
                raise Rejected("name", str(error)) from error
            acquisition.note_sensor_origin(sensor_origin)
            return acquisition
        if acquisition.frame_shape != frame_shape:
            raise Rejected(
                "shape",
                f"frame is {frame_shape}, acquisition {name!r} holds "
                f"{acquisition.frame_shape} frames; send other sizes as another acquisition",
            )
        if acquisition.dtype != np.dtype(dtype):
            raise Rejected(
                "dtype",
                f"frame is {np.dtype(dtype).name}, acquisition {name!r} holds "
                f"{acquisition.dtype.name} frames",
            )
        if check is not None:
            check(frame_shape, acquisition.sensor_origin or sensor_origin)
        acquisition.note_physical(physical or Physical())
        acquisition.note_sensor_origin(sensor_origin)
        return acquisition

    def settle(self) -> dict[str, Exception]:
        """Publish `valid_t` of every acquisition given raw frames through `put_raw` since it
        last settled and trim its arrays to their exact length (the ingest sources call this
        when they fall idle); returns the errors of those that could not be written, by name
        (logged once, tried again at the next call)."""
        return self._publication.publish(trim=True)

    def create(
        self,
        name: str,
        frame_shape: tuple[int, int],
        dtype: str | np.dtype,
        physical: Physical | None = None,
    ) -> Acquisition:
        """Create an acquisition of (Y, X) frames in camera `dtype` with `physical` sizes, or open
        it if it matches (then `physical` goes to `Acquisition.note_physical`).

        Raises ValueError when an acquisition of that name exists with another shape or dtype.
        """
        physical = physical or Physical()
        frame_shape = tuple(int(n) for n in frame_shape)
        dtype = np.dtype(dtype)
        if dtype.name not in RAW_DTYPES:
            raise ValueError(f"raw frames must be one of {RAW_DTYPES}, got {dtype.name}")
        if len(frame_shape) != 2 or min(frame_shape) < 1:
            raise ValueError(f"frame shape must be (Y, X) with Y, X >= 1, got {frame_shape}")
        path = self.path(name)
        with self._lock:
            if not (path / "raw").is_dir():
                stale = self._open.get(name)  # (a weak dictionary: look up once)
                if stale is not None:
                    self._let_go(stale)
                create_group(path, frame_shape, dtype, physical, self.zarr_format)
                if self._ledger.forget_acquisition(name):
                    self._renewals[name] += 1
                    log.warning(
                        "%s: the ledger recorded frames of an acquisition of this name whose "
                        "folder is gone; that record is cleared and the name starts afresh "
                        "(source files still in a watched folder are stored again)",
                        name,
                    )
        acquisition = self.acquisition(name)
        if acquisition.frame_shape != frame_shape or acquisition.dtype != dtype:
            raise ValueError(
                f"acquisition {name!r} holds {acquisition.frame_shape} {acquisition.dtype} frames, "
                f"not {frame_shape} {dtype}"
            )
        acquisition.note_physical(physical)
        return acquisition


def is_store_root(folder: Path) -> bool:
    """Whether `folder` is a data root: it holds the store's ledger."""
    return (folder / LEDGER_FILE).is_file()


def _lock_writer(root: Path) -> int:
    """Take the root's exclusive writer lock (released by the kernel when the process dies);
    returns the lock file's descriptor. UserError naming the holder when it is taken."""
    path = root / WRITER_LOCK
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 64).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise UserError(
            f"{root} is already being written by another pn2v-live process (pid {holder}); "
            "stop it first, or give this one another store root"
        ) from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor
