"""The acquisition store: one OME-Zarr group per acquisition, growing one frame at a time.

Layout under the data root::

    <root>/ingest-ledger.sqlite          SQLite WAL ledger (see ledger.py)
    <root>/<name>.ome.zarr/              group; attrs["pn2v_live"] = {valid_t, closed,
                                         last_frame_at (unix s), expected_frames,
                                         sensor_origin [row, column] when known},
                                         attrs "labels" = ["raw", "denoised"] (see below)
        raw/0        (T, 1, 1, Y, X) camera dtype (uint8/uint16), OME-NGFF multiscale image
        denoised/0   (T, 1, 1, Y, X) float32, same layout; fill value 0 until denoised

Axes are t, c, z, y, x, with the physical scale (frame interval in seconds, z step and pixel size
in micrometres) as the images' `scale` transformation and axis units where known (`Physical`);
each chunk is one frame plane (1, 1, 1, Y, X), so appending a frame
writes one new chunk file and never rewrites an old one. The arrays grow GROW_STEP frames at a
time (a metadata-only resize) and `flush()` trims them to the exact length; the writer also
trims every acquisition when it opens one and when it closes the store, so after a stop (also
one following a crash) every array is exactly as long as its stored frames. Chunk files are
written atomically (temporary file + rename) by zarr's LocalStore, so readers in other processes
(napari, Fiji, dask) see either a whole frame or the fill value. A frame counts as stored only
once its ledger row exists; `valid_t` (number of contiguous stored frames from t = 0) is what
live readers should trust, not the array shape. The ledger records for every denoised frame the
model version and the temporal window ("before:after") that made it.

Durability (power cut): a ledger row commits only after its chunk file and every folder leading
to it are fsynced (`GroupCommit`: concurrent writers' fsyncs share the disk's cache flushes and
their rows one ledger transaction), so after a power cut every frame the ledger (and so the
sender's status reply) calls stored is on disk. A chunk written but not yet recorded is simply
written again when its frame is resent. Array metadata is not fsynced per resize: the writer
makes each array as long as its stored frames when it opens the acquisition.

One process writes a data root at a time: `Store(root, writer=True)` (ingest, serve) holds an
exclusive lock on `<root>/writer.lock` and refuses to open while another process holds it. Only the
writer removes the temporary chunk files (`*.partial`) a killed writer left behind; other processes
(calibrate, viewers) open the store without touching them.

Default is OME-NGFF 0.4 on Zarr format 2; `zarr_format=3` writes OME-NGFF 0.5 on Zarr v3.

The acquisition's group lists its two images in the OME-NGFF `labels` key, the one convention
by which ome-zarr-py's `Reader` (napari-ome-zarr) descends from a group into several sibling
images: opening `<name>.ome.zarr` yields the images raw and denoised, each named and scaled
(they carry no `image-label` metadata, so readers show them as images, not label masks).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from pn2v_live.core.context import SPATIAL, Context
from pn2v_live.errors import UserError
from pn2v_live.storage.atomic import make_folders, sync_folder, sync_paths
from pn2v_live.storage.changes import Changes
from pn2v_live.storage.ledger import LEDGER_FILE, Ledger
from pn2v_live.storage.physical import Physical
from pn2v_live.storage.publication import Publication
from pn2v_live.storage.rejected import FrameCheck, Rejected
from pn2v_live.storage.source_items import SourceItems

log = logging.getLogger(__name__)

SUFFIX = ".ome.zarr"
RAW_DTYPES = ("uint8", "uint16")
AXES = ("t", "c", "z", "y", "x")
IMAGES = ("raw", "denoised")
WRITER_LOCK = "writer.lock"
GROW_STEP = 64  # frames added per array resize while acquiring; flush() trims the rest
IN_FLIGHT_WAIT_SECONDS = 30.0  # longest wait for another writer's write of the same frame
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(name: object) -> str:
    """Return `name` if it is a safe acquisition name, else raise ValueError saying why.

    Safe: 1-128 characters from letters, digits, '.', '_', '-', starting with a letter or digit,
    no '..' (so it can never leave the data root) and not ending in '.ome.zarr'.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"acquisition name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit, without '..'"
        )
    if name.endswith(SUFFIX):
        raise ValueError(f"acquisition name {name!r} must not end in {SUFFIX}")
    return name


def _compressor(zarr_format: int) -> object:
    """Blosc lz4 with byte shuffle: the fastest Blosc codec, so compression keeps up with large
    camera frames; ratio about 1.75 on 16-bit camera data (throughput: docs/benchmarks.md)."""
    if zarr_format == 2:
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


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


class Acquisition:
    """One acquisition: raw and denoised frames of shape `frame_shape` (Y, X).

    Thread-safe: ingest threads may write raw frames while inference threads write denoised ones.
    Created and opened through `Store`; do not construct directly.
    """

    def __init__(
        self,
        group: zarr.Group,
        name: str,
        path: Path,
        ledger: Ledger,
        writer: bool,
        committer: GroupCommit | None = None,
        changed: Callable[[str, int], None] | None = None,
        publication: Publication | None = None,
    ) -> None:
        self.name = name
        self._on_changed = changed  # told (name, 1) after each raw frame stored, (name, 0) on close
        self.path = path
        self._group = group
        self._ledger = ledger
        self._committer = committer or GroupCommit(ledger)
        self._publication = publication or Publication()
        self._lock = threading.Lock()
        # Every frame gets its chunk, even one equal to the fill value (an all-dark frame is data;
        # reconciliation checks chunk files), and zarr skips its per-write fill-value scan.
        always_write = {"write_empty_chunks": True}
        self._raw = group["raw/0"].with_config(always_write)
        self._denoised = group["denoised/0"].with_config(always_write)
        self.frame_shape: tuple[int, int] = tuple(self._raw.shape[3:])
        self.dtype = np.dtype(self._raw.dtype)
        self._physical = _read_physical(group["raw"])
        self._physical_conflict_logged = False
        if writer:
            self._sweep_partials()
            _list_images(group)  # an acquisition made before the listing gets it
        self._stored = set(self._reconcile())
        if writer:  # killed while grown, between the two resizes, or a resize lost to a power cut
            length = max(self._stored, default=-1) + 1
            if self._raw.shape[0] != length or self._denoised.shape[0] != length:
                self._resize(length)
        self._in_flight: set[int] = set()
        self._writing: set[int] = set()
        self.wrote = False  # raw frames written through this object (then close() trims)
        self._last_frame_at: float | None = None  # unix time of the newest write_raw here
        twins = ledger.denoised_twins(name)
        self._versions = {t: version for t, (version, _) in twins.items()}
        self._windows = {t: Context.parse(window) for t, (_, window) in twins.items()}
        self._without_twin = self._stored - self._versions.keys()  # kept current by the writers
        self._valid_t = _contiguous(self._stored)
        self.closed = bool(self._attrs().get("closed", False))
        # A crash before valid_t was published: the writer publishes it (readers, e.g. napari,
        # must not rewrite the attributes the writer is updating).
        if writer and self._valid_t > self._attrs().get("valid_t", 0):
            with self._lock:
                self._set_attrs()

    def __repr__(self) -> str:
        return (
            f"Acquisition({self.name!r}, frames={len(self._stored)}, valid_t={self._valid_t}, "
            f"shape={self.frame_shape}, dtype={self.dtype})"
        )

    # reading ----------------------------------------------------------------------------

    @property
    def valid_t(self) -> int:
        """Number of contiguous stored frames from t = 0 (frames [0, valid_t) are readable)."""
        return self._valid_t

    @property
    def physical(self) -> Physical:
        """Frame interval, z step and pixel size stored with both images (None where unknown)."""
        return self._physical

    @property
    def sensor_origin(self) -> tuple[int, int] | None:
        """The sensor position (row, column) of the frames' pixel [0, 0] as their source gave
        it (`note_sensor_origin`), None when no source said."""
        origin = self._attrs().get("sensor_origin")
        return None if origin is None else (int(origin[0]), int(origin[1]))

    def note_sensor_origin(self, origin: tuple[int, int] | None) -> None:
        """Keep the sensor origin a source item carries; the first one known stays."""
        if origin is not None and self.sensor_origin is None:
            with self._lock:
                self._set_attrs(sensor_origin=[int(origin[0]), int(origin[1])])

    @property
    def expected_frames(self) -> int | None:
        """Total frame count announced by the sender's end marker, if any."""
        return self._attrs().get("expected_frames")

    @property
    def last_frame_at(self) -> float | None:
        """Unix time (s) the newest raw frame was stored, or None when unknown."""
        if self._last_frame_at is not None:
            return self._last_frame_at
        return self._attrs().get("last_frame_at")

    @property
    def frame_count(self) -> int:
        """Number of stored raw frames (without sorting them, unlike `stored_frames`)."""
        return len(self._stored)

    def is_stored(self, t: int) -> bool:
        """Whether raw frame `t` is stored."""
        return t in self._stored

    def stored_frames(self) -> list[int]:
        """Indices of every stored raw frame, ascending (may have gaps when out of order)."""
        with self._lock:
            return sorted(self._stored)

    def read_raw(self, t: int) -> np.ndarray:
        """Raw frame `t` as (Y, X) in the camera dtype; KeyError when it is not stored."""
        if t not in self._stored:
            raise KeyError(f"{self.name}: raw frame {t} is not stored")
        return self._raw[t, 0, 0]

    def read_denoised(self, t: int) -> np.ndarray | None:
        """Denoised frame `t` as float32 (Y, X), or None when it has not been denoised yet."""
        if t not in self._versions:
            return None
        return self._denoised[t, 0, 0]

    def denoised_version(self, t: int) -> int | None:
        """Model version that produced denoised frame `t`, or None."""
        return self._versions.get(t)

    def denoised_window(self, t: int) -> Context | None:
        """The frames around `t` that the model saw for denoised frame `t`, or None."""
        return self._windows.get(t)

    def has_later_frames(self, t: int, after: int) -> bool:
        """Whether the `after` frames following `t` are stored, or never will be (closed)."""
        return self.closed or all(t + j in self._stored for j in range(1, after + 1))

    def frames_to_refine(self, after: int) -> list[int]:
        """Denoised frames whose model saw fewer than `after` later frames (live twins) and
        whose later frames are now there (`has_later_frames`), newest first."""
        with self._lock:
            windows = dict(self._windows)
        refinable = (
            t for t, window in windows.items()
            if window.after < after and self.has_later_frames(t, after)
        )  # fmt: skip
        return sorted(refinable, reverse=True)

    def frames_to_denoise(self, current_version: int) -> list[int]:
        """Stored frames without a denoised twin from `current_version` or newer, newest first.

        Looks at every stored frame; `frames_without_twin` is the cheap question.
        """
        with self._lock:
            stored = sorted(self._stored, reverse=True)
        return [t for t in stored if self._versions.get(t, -1) < current_version]

    @property
    def untwinned_count(self) -> int:
        """Number of stored frames with no denoised twin at all (without listing them)."""
        return len(self._without_twin)

    def frames_without_twin(self) -> list[int]:
        """Stored frames with no denoised twin at all, newest first; costs only their number."""
        with self._lock:
            return sorted(self._without_twin, reverse=True)

    # writing ----------------------------------------------------------------------------

    def put_raw(self, t: int, pixels: np.ndarray) -> Literal["stored", "duplicate"]:
        """Store raw frame `t` (Y, X) exactly once: "stored" when this call wrote it (on disk
        and recorded when this returns, see `write_raw`), "duplicate" when it is stored already
        with these pixels (nothing written).

        A different frame under a stored frame's number raises Rejected("conflict") and leaves
        the stored one as it is (two sources or senders writing the same acquisition). While
        another writer stores frame `t`, this waits for that write (up to
        IN_FLIGHT_WAIT_SECONDS) to compare with its pixels, or to take the frame over if that
        write fails. The on-disk `valid_t` counts the frame within PUBLISH_SECONDS, or once the
        store settles (`publication.Publication`).
        """
        deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
        while not self._claim(t):
            try:
                stored = self.read_raw(t)
            except KeyError:  # another writer is storing it right now
                if time.monotonic() > deadline:
                    return "duplicate"  # that write hangs (disk): counted as one, as it may be
                time.sleep(0.01)
                continue
            if not np.array_equal(stored, pixels):
                raise Rejected(
                    "conflict",
                    f"frame {t} of {self.name!r} is already stored with other pixels; the "
                    "stored frame is kept — do two sources or senders write this acquisition? "
                    "send each under its own acquisition name",
                )
            return "duplicate"
        try:
            self.write_raw(t, pixels, publish=False)
        except BaseException:
            self._release(t)
            raise
        self._publication.stored(self)
        return "stored"

    def _claim(self, t: int) -> bool:
        """Reserve raw frame `t` for one writer; False when it is stored or being written."""
        with self._lock:
            if t in self._stored or t in self._in_flight:
                return False
            self._in_flight.add(t)
            return True

    def _release(self, t: int) -> None:
        """Give up a claim after a failed write so the frame can be delivered again."""
        with self._lock:
            self._in_flight.discard(t)

    def write_raw(self, t: int, frame: np.ndarray, publish: bool = True) -> None:
        """Store raw frame `t` (Y, X): chunk first, fsync of it and its folders, ledger row
        last (see `GroupCommit`); when this returns the frame is on disk and recorded.

        Overwrites any earlier chunk at `t`: a frame that must be stored exactly once goes
        through `put_raw` (the ingest sources). When this returns, the on-disk `valid_t` counts
        the frame, unless `publish` is False (`put_raw` leaves that write to its
        `Publication`). The arrays grow in steps of GROW_STEP frames, trimmed to the exact
        length by `flush()`.
        """
        if t < 0:
            raise ValueError(f"{self.name}: frame index must be >= 0, got {t}")
        self._check_frame(frame, self.dtype)
        with self._lock:
            self.wrote = True
            self._writing.add(t)
            self._ensure_length(t + 1)
        try:
            self._raw[t, 0, 0] = frame
            self._committer.commit(self._durable_paths(self._raw, t), frame=(self.name, t))
        finally:
            with self._lock:
                self._writing.discard(t)
        with self._lock:
            self._stored.add(t)
            if t not in self._versions:
                self._without_twin.add(t)
            self._in_flight.discard(t)
            self._last_frame_at = round(time.time(), 3)
            while self._valid_t in self._stored:
                self._valid_t += 1
            if publish:
                self._set_attrs()
        if self._on_changed is not None:
            self._on_changed(self.name, 1)

    def write_denoised(
        self, t: int, frame: np.ndarray, model_version: int, window: Context = SPATIAL
    ) -> None:
        """Store the float32 denoised frame `t` (Y, X) produced by model `model_version` from
        the frames `window` around `t`."""
        if t not in self._stored:
            raise KeyError(f"{self.name}: cannot denoise frame {t}, its raw frame is not stored")
        self._check_frame(frame, np.dtype("float32"))
        self._denoised[t, 0, 0] = frame
        row = (self.name, t, int(model_version), str(window))
        self._committer.commit(self._durable_paths(self._denoised, t), denoised=row)
        with self._lock:
            self._versions[t] = int(model_version)
            self._windows[t] = window
            self._without_twin.discard(t)

    def note_physical(self, physical: Physical) -> None:
        """Take the physical sizes a source item (file, message) carries: written into both
        images' metadata when the acquisition has none yet; once it has some, other sizes are
        ignored (logged once per acquisition): the first sizes known stay."""
        if not physical.known or physical == self._physical:
            return
        with self._lock:
            if not self._physical.known:
                for image in IMAGES:
                    _write_image_metadata(self._group[image], image, physical)
                self._physical = physical
            elif not self._physical_conflict_logged:
                self._physical_conflict_logged = True
                log.warning(
                    "%s: a frame carries physical sizes %s, the acquisition keeps its first ones "
                    "%s (logged once)",
                    self.name, physical.as_dict(), self._physical.as_dict(),
                )  # fmt: skip

    def close(self, expected_frames: int | None = None) -> None:
        """Mark the acquisition finished (the sender's end marker); late frames still store."""
        extra = {} if expected_frames is None else {"expected_frames": int(expected_frames)}
        self.flush(closed=True, **extra)
        self.closed = True
        if self._on_changed is not None:
            self._on_changed(self.name, 0)

    def flush(self, trim: bool = True, **attrs: object) -> bool:
        """Write `valid_t` (and `attrs`) to disk; with `trim`, also cut both arrays to the exact
        length (last stored frame + 1) so readers see no empty frames at the end. True when
        that changed their length.

        The store trims when its ingest sources fall idle (`Store.settle`); `close()` and
        `Store.close()` do too.
        """
        with self._lock:
            busy = self._stored | self._writing | self._in_flight
            length = max(busy, default=-1) + 1
            resize = trim and (self._raw.shape[0], self._denoised.shape[0]) != (length, length)
            if resize:
                self._resize(length)
            self._set_attrs(**attrs)
            return resize

    # internals --------------------------------------------------------------------------

    def _check_frame(self, frame: np.ndarray, dtype: np.dtype) -> None:
        if frame.shape != self.frame_shape or frame.dtype != dtype:
            raise ValueError(
                f"{self.name}: frame is {frame.shape} {frame.dtype}, "
                f"the acquisition holds {self.frame_shape} {dtype}"
            )

    def _durable_paths(self, array: zarr.Array, t: int) -> list[Path]:
        """What to fsync so frame `t`'s chunk of `array` survives a power cut: the chunk file and
        every folder from the array's own down to the chunk's (each frame's key, e.g.
        `t/0/0/0/0`, makes new folders)."""
        root = Path(array.store_path.store.root) / array.store_path.path
        chunk = root / array.metadata.encode_chunk_key((t, 0, 0, 0, 0))
        paths = [chunk]
        folder = chunk.parent
        while folder != root and root in folder.parents:
            paths.append(folder)
            folder = folder.parent
        return [*paths, root]

    def _ensure_length(self, frames: int) -> None:
        """Grow both images to hold `frames` frames, in steps of GROW_STEP (caller holds lock).

        Growing rewrites array metadata only, never a chunk; stepping keeps that rare.
        """
        if self._raw.shape[0] < frames:
            self._resize(frames + GROW_STEP - 1)

    def _resize(self, frames: int) -> None:
        """Set both arrays' length to `frames`, rewriting their metadata only.

        zarr's own shrink lists every chunk of the old shape to delete those outside (seconds
        per trim for long acquisitions); no chunk of a stored frame lies outside here, and one
        left there by a crash is overwritten when its frame arrives.
        """
        shape = (frames, 1, 1, *self.frame_shape)
        for array in (self._raw, self._denoised):
            sync(array._async_array.resize(shape, delete_outside_chunks=False))

    def _attrs(self) -> dict:
        return dict(self._group.attrs.get("pn2v_live", {}))

    def _set_attrs(self, **values: object) -> None:
        """Rewrite the group's `pn2v_live` attributes with the current `valid_t` (caller locks)."""
        attrs = self._attrs() | values | {"valid_t": self._valid_t}
        if self._last_frame_at is not None:
            attrs["last_frame_at"] = self._last_frame_at
        if attrs != self._attrs():
            self._group.attrs["pn2v_live"] = attrs

    def _sweep_partials(self) -> None:
        """Remove the temporary chunk files (`*.partial`) of writes a killed writer never finished.

        Only the store's one writer calls this, before it writes here, so none is still in use.
        """
        partials = list(self.path.rglob("*.partial"))
        for partial in partials:
            partial.unlink(missing_ok=True)
        if partials:
            log.info("%s: removed %d unfinished chunk write(s)", self.name, len(partials))

    def _reconcile(self) -> list[int]:
        """Ledger frames whose chunk really exists; forget the others.

        Safe while another process writes the acquisition: a ledger row always follows its chunk.
        """
        root = Path(self._raw.store_path.store.root) / self._raw.store_path.path
        frames = self._ledger.frames(self.name)
        encode = self._raw.metadata.encode_chunk_key
        missing = [t for t in frames if not (root / encode((t, 0, 0, 0, 0))).is_file()]
        if missing:
            log.warning(
                "%s: %d frame(s) recorded in the ledger have no chunk (power cut?); "
                "they will be stored again when resent: %s",
                self.name,
                len(missing),
                missing[:20],
            )
            self._ledger.forget_frames(self.name, missing)
        return sorted(set(frames) - set(missing))


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
        self._open: dict[str, Acquisition] = {}
        self._unopenable: set[str] = set()  # acquisitions already logged as damaged
        self._watchers: list[Changes] = []

    def close(self) -> None:
        """Flush the acquisitions this process wrote raw frames to (the writer: trim every
        acquisition to its stored frames, see `trim_all`), close the ledger and give up the
        writer lock."""
        if self.writer:
            self.trim_all()
        else:
            with self._lock:
                for acquisition in self._open.values():
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
                    if all(_array_length(array) == length for array in arrays):
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

    def acquisitions_without_twins(self) -> set[str]:
        """Names of the acquisitions with a stored raw frame that has no denoised twin (one
        query over every frame: for a first look at the store, not for every pass)."""
        return self._ledger.acquisitions_without_twins()

    def watch(self) -> Changes:
        """A feed of the names of acquisitions given raw frames or closed from now on
        (`WorkingSet`, the viewer's `AcquisitionList`)."""
        with self._lock:
            self._watchers.append(Changes())
            return self._watchers[-1]

    def _notify_watchers(self, name: str, frames: int) -> None:
        for changes in self._watchers:
            changes.add(name, frames)

    def open_acquisitions(self, names: Iterable[str] | None = None) -> list[Acquisition]:
        """Every acquisition that opens (or those of `names`), by name; one that does not
        (damaged metadata, gone) is logged once and left out, so it never stops work on the
        others."""
        opened = []
        for name in self.acquisitions() if names is None else names:
            try:
                opened.append(self.acquisition(name))
            except Exception as error:  # zarr, JSON and OS errors of a damaged folder
                if name not in self._unopenable:
                    self._unopenable.add(name)
                    log.error("cannot open acquisition %s, left alone: %s: %s",
                              name, type(error).__name__, error)  # fmt: skip
        return opened

    def path(self, name: str) -> Path:
        return self.root / (validate_name(name) + SUFFIX)

    def acquisition(self, name: str) -> Acquisition:
        """Open an existing acquisition; KeyError when there is none of that name."""
        path = self.path(name)
        with self._lock:
            if name not in self._open:
                if not (path / "raw").is_dir():
                    raise KeyError(f"no acquisition {name!r} under {self.root}")
                group = zarr.open_group(path, mode="r+")
                self._open[name] = Acquisition(
                    group,
                    name,
                    path,
                    self._ledger,
                    self.writer,
                    self.committer,
                    self._notify_watchers,
                    self._publication,
                )
            return self._open[name]

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
            if name not in self._open and not (path / "raw").is_dir():
                self._create_group(path, frame_shape, dtype, physical)
                if self._ledger.forget_acquisition(name):
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

    def _create_group(
        self, path: Path, frame_shape: tuple[int, int], dtype: np.dtype, physical: Physical
    ) -> None:
        """Build the empty acquisition beside `path` and rename it into place, so readers never
        see a half-made one (a leftover from a crash mid-creation is replaced)."""
        building = path.with_name(f".{path.name}.creating")
        shutil.rmtree(building, ignore_errors=True)
        group = zarr.open_group(building, mode="w", zarr_format=self.zarr_format)
        for image, image_dtype, fill in (("raw", dtype, 0), ("denoised", np.float32, 0.0)):
            sub = group.create_group(image)
            options = (
                {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
                if self.zarr_format == 2
                else {"dimension_names": AXES}
            )
            sub.create_array(
                "0",
                shape=(0, 1, 1, *frame_shape),
                chunks=(1, 1, 1, *frame_shape),
                dtype=image_dtype,
                fill_value=fill,
                compressors=_compressor(self.zarr_format),
                **options,
            )
            _write_image_metadata(sub, image, physical)
        _list_images(group)
        group.attrs["pn2v_live"] = {"valid_t": 0, "closed": False}
        sync_paths([*building.rglob("*"), building])  # all of it on disk before it appears
        building.rename(path)
        sync_folder(self.root)


def is_store_root(folder: Path) -> bool:
    """Whether `folder` is a data root: it holds the store's ledger."""
    return (folder / LEDGER_FILE).is_file()


def _ngff_format(group: zarr.Group) -> object:
    """The OME-NGFF version of the store's Zarr format: 0.4 on format 2, 0.5 on format 3."""
    # ome-zarr pulls in dask and more (~2 s); only writing metadata needs it.
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if group.metadata.zarr_format == 2 else FormatV05()


def _write_image_metadata(image: zarr.Group, name: str, physical: Physical) -> None:
    """(Re)write the OME-NGFF multiscales metadata of image group `image` (one level, "0"): its
    `name`, axes t, c, z, y, x with units and `physical`'s scale."""
    from ome_zarr.writer import write_multiscales_metadata

    scale = [{"type": "scale", "scale": physical.ngff_scale()}]
    write_multiscales_metadata(
        image,
        [{"path": "0", "coordinateTransformations": scale}],
        fmt=_ngff_format(image),
        axes=physical.ngff_axes(),
        name=name,
    )


def _read_physical(image: zarr.Group) -> Physical:
    """The physical sizes in image group `image`'s OME-NGFF metadata; all unknown when it has
    none or they cannot be read (the frames are still usable)."""
    attrs = image.attrs.asdict()
    try:
        multiscale = attrs.get("ome", attrs)["multiscales"][0]
        transforms = multiscale["datasets"][0]["coordinateTransformations"]
        [scale] = [t["scale"] for t in transforms if t.get("type") == "scale"]
        return Physical.from_ngff(multiscale["axes"], scale)
    except (KeyError, IndexError, TypeError, ValueError):
        return Physical()


def _list_images(group: zarr.Group) -> None:
    """List the images in the acquisition group's OME-NGFF `labels` key (see the module doc),
    unless they are listed."""
    attrs = group.attrs.asdict()
    if attrs.get("ome", attrs).get("labels") == list(IMAGES):
        return
    from ome_zarr.writer import add_metadata

    fmt = _ngff_format(group)
    listing = {"labels": list(IMAGES)}
    if fmt.version != "0.4":
        listing["version"] = fmt.version  # NGFF 0.5: every "ome" attribute names its version
    add_metadata(group, listing, fmt=fmt)


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


def _array_length(folder: Path) -> int | None:
    """The first dimension of the zarr array in `folder` (format 2 or 3), read from its metadata
    file alone; None when that cannot be read."""
    for metadata in (".zarray", "zarr.json"):
        try:
            return int(json.loads((folder / metadata).read_text())["shape"][0])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return None
    return None


def _contiguous(frames: set[int]) -> int:
    """Length of the run 0, 1, 2, ... contained in `frames`."""
    n = 0
    while n in frames:
        n += 1
    return n
