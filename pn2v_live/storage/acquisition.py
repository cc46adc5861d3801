"""One acquisition of the store: raw frames as they arrive, denoised twins as they are made.

A frame counts as stored only once its ledger row exists, and its row commits only after its
chunk is on disk (`GroupCommit`). `valid_t` (number of contiguous stored frames from t = 0) is
what live readers should trust, not the array shape: the arrays grow GROW_STEP frames at a time
(a metadata-only resize) and `flush()` trims them to the exact length; the writer also trims
every acquisition when it opens one and when it closes the store, so after a stop (also one
following a crash) every array is exactly as long as its stored frames. Array metadata is not
fsynced per resize: the writer makes each array as long as its stored frames when it opens the
acquisition. The ledger records for every denoised frame the model version and the temporal
window ("before:after") that made it.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import zarr

from pn2v_live.core.context import SPATIAL, Context
from pn2v_live.storage.group_commit import GroupCommit
from pn2v_live.storage.layout import (
    IMAGES,
    durable_paths,
    list_images,
    read_physical,
    resize_arrays,
    write_image_metadata,
)
from pn2v_live.storage.ledger import Ledger
from pn2v_live.storage.physical import Physical
from pn2v_live.storage.publication import Publication
from pn2v_live.storage.recovery import reconcile, sweep_partials
from pn2v_live.storage.rejected import Rejected

log = logging.getLogger(__name__)

GROW_STEP = 64  # frames added per array resize while acquiring; flush() trims the rest
IN_FLIGHT_WAIT_SECONDS = 30.0  # longest wait for another writer's write of the same frame


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
        renewal: int = 0,
    ) -> None:
        self.name = name
        self.identity = (name, renewal)  # caches of frames key on it, not on a re-usable name
        self.gone = False  # its folder was deleted (`Store`): writes fail, metadata stays unwritten
        # told (name, 1) after each raw frame stored, (name, 0) after a denoised one and on close
        self._on_changed = changed
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
        self._physical = read_physical(group["raw"])
        self._physical_conflict_logged = False
        if writer:  # the one writer: no other process is writing a chunk here
            sweep_partials(path, name)
            list_images(group)  # an acquisition made before the listing gets it
        self._stored = set(reconcile(ledger, name, self._raw))
        if writer:  # killed while grown, between the two resizes, or a resize lost to a power cut
            length = max(self._stored, default=-1) + 1
            if self._raw.shape[0] != length or self._denoised.shape[0] != length:
                resize_arrays((self._raw, self._denoised), length)
        self._in_flight: set[int] = set()
        self._writing: set[int] = set()
        self.wrote = False  # raw frames written through this object (then close() trims)
        self._last_frame_at: float | None = None  # unix time of the newest write_raw here
        twins = ledger.denoised_twins(name)
        self._versions = {t: version for t, (version, _) in twins.items()}
        self._windows = {t: Context.parse(window) for t, (_, window) in twins.items()}
        self._without_twin = self._stored - self._versions.keys()  # kept current by the writers
        self._valid_t = 0
        self._advance_valid_t()
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
        """Stored frames without a denoised twin from `current_version` or newer, newest first
        (looks at every stored frame; `frames_without_twin` is the cheap question)."""
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
        with these pixels (nothing written). A different frame under a stored frame's number
        raises Rejected("conflict") and leaves the stored one as it is (two sources or senders
        writing the same acquisition). While another writer stores frame `t`, this waits for
        that write (up to IN_FLIGHT_WAIT_SECONDS) to compare with its pixels, or to take the
        frame over if that write fails. The on-disk `valid_t` counts the frame within
        PUBLISH_SECONDS, or once the store settles (`publication.Publication`)."""
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
            self._committer.commit(durable_paths(self._raw, t), frame=(self.name, t))
        finally:
            with self._lock:
                self._writing.discard(t)
        with self._lock:
            self._stored.add(t)
            if t not in self._versions:
                self._without_twin.add(t)
            self._in_flight.discard(t)
            self._last_frame_at = round(time.time(), 3)
            self._advance_valid_t()
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
        self._committer.commit(durable_paths(self._denoised, t), denoised=row)
        with self._lock:
            self._versions[t] = int(model_version)
            self._windows[t] = window
            self._without_twin.discard(t)
        if self._on_changed is not None:
            self._on_changed(self.name, 0)

    def note_physical(self, physical: Physical) -> None:
        """Take the physical sizes a source item (file, message) carries: written into both
        images' metadata when the acquisition has none yet; once it has some, other sizes are
        ignored (logged once per acquisition): the first sizes known stay."""
        if not physical.known or physical == self._physical or self.gone:
            return
        with self._lock:
            if not self._physical.known:
                for image in IMAGES:
                    write_image_metadata(self._group[image], image, physical)
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
        that changed their length. The store trims when its ingest sources fall idle
        (`Store.settle`); `close()` and `Store.close()` do too."""
        if self.gone:
            return False
        with self._lock:
            busy = self._stored | self._writing | self._in_flight
            length = max(busy, default=-1) + 1
            resize = trim and (self._raw.shape[0], self._denoised.shape[0]) != (length, length)
            if resize:
                resize_arrays((self._raw, self._denoised), length)
            self._set_attrs(**attrs)
            return resize

    # internals --------------------------------------------------------------------------

    def _check_frame(self, frame: np.ndarray, dtype: np.dtype) -> None:
        if self.gone:  # a new acquisition of this name may be in the folder now
            raise FileNotFoundError(errno.ENOENT, f"{self.name}: its folder was deleted", self.path)
        if frame.shape != self.frame_shape or frame.dtype != dtype:
            raise ValueError(
                f"{self.name}: frame is {frame.shape} {frame.dtype}, "
                f"the acquisition holds {self.frame_shape} {dtype}"
            )

    def _ensure_length(self, frames: int) -> None:
        """Grow both images to hold `frames` frames, in steps of GROW_STEP (caller holds lock):
        array metadata only, never a chunk; stepping keeps that rare."""
        if self._raw.shape[0] < frames:
            resize_arrays((self._raw, self._denoised), frames + GROW_STEP - 1)

    def _advance_valid_t(self) -> None:
        """Extend `valid_t` over the stored frames that now follow it (caller locks)."""
        while self._valid_t in self._stored:
            self._valid_t += 1

    def _attrs(self) -> dict:
        return dict(self._group.attrs.get("pn2v_live", {}))

    def _set_attrs(self, **values: object) -> None:
        """Rewrite the group's `pn2v_live` attributes with the current `valid_t` (caller locks)."""
        attrs = self._attrs() | values | {"valid_t": self._valid_t}
        if self._last_frame_at is not None:
            attrs["last_frame_at"] = self._last_frame_at
        if attrs != self._attrs():
            self._group.attrs["pn2v_live"] = attrs
