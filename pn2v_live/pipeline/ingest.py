"""What both ingest sources share: matching frames to acquisitions and storing each exactly once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from pn2v_live.storage.physical import Physical
from pn2v_live.storage.store import RAW_DTYPES, Acquisition, Store
from pn2v_live.telemetry import FRAMES_INGESTED, FRAMES_REJECTED, LAST_FRAME_TIMESTAMP

log = logging.getLogger(__name__)

IN_FLIGHT_WAIT_SECONDS = 30.0  # longest wait for another writer's write of the same frame

# Checks that (Y, X) frames at a sensor origin (row, column; None: unknown) can be denoised,
# raising Rejected when not (e.g. `camera_frames.CameraFrames.admit`: beyond the camera maps).
FrameCheck = Callable[[tuple[int, ...], tuple[int, int] | None], None]


class Rejected(Exception):
    """A source item that cannot be stored; `reason` is a short metric label, the text says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def reject(source: str, error: Rejected, what: str) -> None:
    """Log and count a rejected item (`what` names it for the log line, never for the metric)."""
    FRAMES_REJECTED.labels(source=source, reason=error.reason).inc()
    log.warning("%s rejected %s (%s): %s", source, what, error.reason, error)


def open_acquisition(
    store: Store,
    name: str,
    frame_shape: tuple[int, ...],
    dtype: np.dtype,
    physical: Physical | None = None,
    sensor_origin: tuple[int, int] | None = None,
    check: FrameCheck | None = None,
) -> Acquisition:
    """The acquisition `name` for (Y, X) frames of `dtype`, created on first use; `physical`, the
    sizes the frame's source carries, go to `Acquisition.note_physical`, its `sensor_origin` to
    `Acquisition.note_sensor_origin`.

    Raises Rejected("dtype"/"shape"/"name") when the frame cannot belong to it, and what `check`
    raises for the frame at its acquisition's sensor origin (before creating anything).
    """
    if np.dtype(dtype).name not in RAW_DTYPES:
        raise Rejected(
            "dtype", f"raw frames must be {' or '.join(RAW_DTYPES)}, got {np.dtype(dtype).name}"
        )
    try:
        acquisition = store.acquisition(name)
    except KeyError:
        if check is not None:
            check(tuple(frame_shape), sensor_origin)
        try:
            acquisition = store.create(name, frame_shape, dtype, physical)
        except ValueError as error:
            raise Rejected("name", str(error)) from error
        acquisition.note_sensor_origin(sensor_origin)
        return acquisition
    if acquisition.frame_shape != tuple(frame_shape):
        raise Rejected(
            "shape",
            f"frame is {tuple(frame_shape)}, acquisition {name!r} holds "
            f"{acquisition.frame_shape} frames; send other sizes as another acquisition",
        )
    if acquisition.dtype != np.dtype(dtype):
        raise Rejected(
            "dtype",
            f"frame is {np.dtype(dtype).name}, acquisition {name!r} holds "
            f"{acquisition.dtype.name} frames",
        )
    if check is not None:
        check(tuple(frame_shape), acquisition.sensor_origin or sensor_origin)
    acquisition.note_physical(physical or Physical())
    acquisition.note_sensor_origin(sensor_origin)
    return acquisition


def store_frame(
    acquisition: Acquisition, t: int, pixels: np.ndarray, source: str, publish: bool = True
) -> bool:
    """Store raw frame `t` unless it is already stored or being stored; True when written.

    A resent copy of a stored frame is ignored (False); a different frame under a stored
    frame's number raises Rejected("conflict") and leaves the stored one as it is (two
    sources or senders writing the same acquisition). While another writer stores frame `t`,
    this waits for that write (up to IN_FLIGHT_WAIT_SECONDS) to compare with its pixels, or to
    take the frame over if that write fails. `publish` as in `Acquisition.write_raw`.
    """
    deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while not acquisition.claim(t):
        try:
            stored = acquisition.read_raw(t)
        except KeyError:  # another writer is storing it right now
            if time.monotonic() > deadline:
                return False  # that write hangs (disk): counted as a duplicate, as it may be
            time.sleep(0.01)
            continue
        if not np.array_equal(stored, pixels):
            raise Rejected(
                "conflict",
                f"frame {t} of {acquisition.name!r} is already stored with other pixels; the "
                "stored frame is kept — do two sources or senders write this acquisition? "
                "send each under its own acquisition name",
            )
        return False
    try:
        acquisition.write_raw(t, pixels, publish)
    except BaseException:
        acquisition.release(t)
        raise
    FRAMES_INGESTED.labels(source=source).inc()
    LAST_FRAME_TIMESTAMP.set(time.time())
    return True
