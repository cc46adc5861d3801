"""Forward every frame Micro-Manager acquires (through pycro-manager) to pn2v-live as it arrives.

    pip install pycromanager            # Micro-Manager must be running with its ZMQ server on
    python service/examples/pycromanager_forward.py --to tcp://127.0.0.1:5555 \
        --acquisition cells_01 --frames 200 --interval-s 0.5

pycro-manager calls the `Forwarder` for each image (a 2-D numpy array in the camera's dtype and
Micro-Manager's metadata dict) before Micro-Manager saves it; the frame goes to the daemon's
ZeroMQ receiver, numbered by its time index, and Micro-Manager keeps its own copy as usual.
Only single-channel, single-plane time series are stored by pn2v-live.

Physical sizes: the pixel size from `PixelSizeUm` (0 = not calibrated in Micro-Manager: none
sent) and the frame interval from the `ElapsedTime-ms` of the first two time points go into the
header (`pixel_size_um`, `interval_s`). So that the first frame already carries both, it waits
for the second (one frame held; `Forwarder.finish` sends it if no second comes).

Memory stays bounded: frames wait only in the sender's ZeroMQ queue, at most `--buffer-frames`
of them (plus what the operating system's socket buffers hold); the forwarder keeps no frames,
only the numbers of those it could not forward. When the queue is full (pn2v-live slower than
the camera, restarting, or not running), a frame waits up to `--wait-s` seconds; if the queue is
still full it is not forwarded, a WARNING says so, and later frames are forwarded only when the
queue has room at once, so the acquisition itself is never held up for more than that one wait.
Frames not forwarded are counted, never lost: after the acquisition the script resends every
frame pn2v-live has not stored, read back one at a time from Micro-Manager's saved dataset, and
then sends the end marker.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

import numpy as np

from pn2v_live.storage.physical import Physical
from pn2v_live.wire.sender import FrameSender

log = logging.getLogger("pycromanager_forward")

DEFAULT_BUFFER_FRAMES = 16
DEFAULT_WAIT_S = 5.0


def pixel_size_um(metadata: dict) -> float | None:
    """Micro-Manager's `PixelSizeUm` (number or string) in µm, None when absent or 0."""
    try:
        size = float(metadata.get("PixelSizeUm", 0))
    except (TypeError, ValueError):
        return None
    return size if size > 0 else None


def elapsed_s(metadata: dict) -> float | None:
    """Micro-Manager's `ElapsedTime-ms` (time since the acquisition started) in seconds."""
    try:
        return float(metadata["ElapsedTime-ms"]) / 1000
    except (KeyError, TypeError, ValueError):
        return None


class Forwarder:
    """pycro-manager image processor: `forwarder(image, metadata)` forwards the (Y, X) image
    through `sender` as frame `metadata["Axes"]["time"]` of `acquisition` and returns
    (image, metadata) unchanged for Micro-Manager to save. See the module docstring for the
    physical sizes and what happens while the receiver is slow or absent."""

    def __init__(self, sender: FrameSender, acquisition: str, wait_s: float = DEFAULT_WAIT_S):
        self.sender = sender
        self.acquisition = acquisition
        self.wait_s = wait_s
        self.frames = 0  # one past the highest time index seen
        self.forwarded = 0
        self.not_forwarded: list[int] = []  # time indices, resent after the acquisition
        self.physical: Physical | None = None  # known from the second frame (or `finish`)
        self._first: tuple[int, np.ndarray, dict] | None = None
        self._plane: dict | None = None  # the first image's axes other than time
        self._stalled = False  # the queue stayed full: do not wait for it again

    def __call__(self, image: np.ndarray, metadata: dict) -> tuple[np.ndarray, dict]:
        axes = dict(metadata.get("Axes", {}))
        t = int(axes.pop("time", self.frames))
        if self._plane is None:
            self._plane = axes
        elif axes != self._plane:  # it would take the first image's frame number
            raise ValueError(
                f"pn2v-live stores single-channel, single-plane time series; this image is "
                f"{axes}, the first was {self._plane}: acquire one channel and one z plane "
                "(and one position) per acquisition"
            )
        self.frames = max(self.frames, t + 1)
        if self.physical is None and self._first is None:
            self._first = (t, image.copy(), metadata)  # waits for the second frame's time
            return image, metadata
        if self.physical is None:
            self._settle(t, metadata)
        self._send(t, image)
        return image, metadata

    def finish(self) -> None:
        """Send the first frame if it is still held (an acquisition of one frame)."""
        if self._first is not None:
            self._settle(None, None)

    def _settle(self, t: int | None, metadata: dict | None) -> None:
        """Fix the physical sizes from the held first frame and frame `t`, then send the first."""
        first_t, image, first = self._first
        self._first = None
        interval = None
        if metadata is not None and t != first_t:
            start, now = elapsed_s(first), elapsed_s(metadata)
            if start is not None and now is not None and now > start:
                interval = (now - start) / (t - first_t)
        size = pixel_size_um(first)
        self.physical = Physical(None if size is None else (size, size), None, interval)
        self._send(first_t, image)

    def _send(self, t: int, image: np.ndarray) -> None:
        try:
            self.sender.send_frame(
                self.acquisition, t, image, physical=self.physical,
                timeout=0 if self._stalled else self.wait_s,
            )  # fmt: skip
        except TimeoutError:
            self.not_forwarded.append(t)
            if not self._stalled:
                self._stalled = True
                log.warning(
                    "%s: pn2v-live at %s took no frame for %.1f s (slow, restarting or not "
                    "running): frame %d not forwarded; frames are now forwarded only while its "
                    "queue has room, and the others resent from the saved data at the end",
                    self.acquisition, self.sender.to, self.wait_s, t,
                )  # fmt: skip
            return
        if self._stalled:
            self._stalled = False
            log.warning(
                "%s: pn2v-live takes frames again; %d not forwarded so far, resent at the end",
                self.acquisition, len(self.not_forwarded),
            )  # fmt: skip
        self.forwarded += 1


class SavedFrames(Sequence):
    """Frames 0 … count−1 read one at a time by `read(t)` (from Micro-Manager's saved dataset)
    when a resend asks for them, so a resend never holds the acquisition in memory."""

    def __init__(self, read: Callable[[int], np.ndarray], count: int) -> None:
        self._read = read
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, t: int) -> np.ndarray:
        if not 0 <= t < self._count:
            raise IndexError(t)
        return np.asarray(self._read(t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--to", default="tcp://127.0.0.1:5555", help="pn2v-live frame endpoint")
    parser.add_argument("--acquisition", required=True, help="acquisition name in the store")
    parser.add_argument("--frames", type=int, required=True, help="number of time points")
    parser.add_argument("--interval-s", type=float, default=0.0, help="time between frames")
    parser.add_argument("--save-dir", default="mm-data", help="where Micro-Manager saves")
    parser.add_argument(
        "--buffer-frames", type=int, default=DEFAULT_BUFFER_FRAMES,
        help="frames queued for pn2v-live at most (memory: this many frames)",
    )  # fmt: skip
    parser.add_argument(
        "--wait-s", type=float, default=DEFAULT_WAIT_S,
        help="seconds a frame waits for room in the queue before it is left for the resend",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from pycromanager import Acquisition, multi_d_acquisition_events

    with FrameSender(args.to, high_water_mark=args.buffer_frames) as sender:
        forwarder = Forwarder(sender, args.acquisition, args.wait_s)
        with Acquisition(
            directory=args.save_dir, name=args.acquisition, image_process_fn=forwarder
        ) as acquisition:
            acquisition.acquire(
                multi_d_acquisition_events(
                    num_time_points=args.frames, time_interval_s=args.interval_s
                )
            )
        forwarder.finish()
        dataset = acquisition.get_dataset()
        saved = SavedFrames(lambda t: dataset.read_image(time=t), forwarder.frames)
        sender.ensure_stored(args.acquisition, saved, timeout=600, physical=forwarder.physical)
        sender.end(args.acquisition, frames=len(saved))
    print(
        f"{args.acquisition}: {len(saved)} frames stored by pn2v-live "
        f"({len(forwarder.not_forwarded)} of them resent from the saved data after the "
        "acquisition, the receiver being slow or absent when they were taken)"
    )


if __name__ == "__main__":
    main()
