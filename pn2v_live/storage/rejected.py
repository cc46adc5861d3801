"""Why the store refuses a raw frame: `Rejected`, raised by `Store.put_raw` and its checks."""

from __future__ import annotations

from collections.abc import Callable

# Checks that (Y, X) frames at a sensor origin (row, column; None: unknown) can be denoised,
# raising Rejected when not (e.g. `camera_frames.CameraFrames.admit`: beyond the camera maps).
FrameCheck = Callable[[tuple[int, ...], tuple[int, int] | None], None]


class Rejected(Exception):
    """A frame (or source item) that cannot be stored; `reason` is a short metric label, the
    text says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
