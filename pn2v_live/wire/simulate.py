"""A simulated microscope: plays a stack (or synthetic frames) at a frame rate, over ZeroMQ or
as TIFF files that appear in a folder the way a camera writes them (in pieces)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from pn2v_live.core import synthetic
from pn2v_live.storage.images import read_stack
from pn2v_live.wire.sender import FrameSender


def movie(
    frames: int, source: Path | None = None, shape: tuple[int, int] = (256, 256), seed: int = 0
) -> np.ndarray:
    """`frames` frames (T, Y, X): the stack in `source` repeated as needed, or synthetic
    uint16 frames of a static scene with Poisson–Gaussian camera noise."""
    if source is None:
        return synthetic.acquisition(synthetic.Camera(), frames, shape, seed=seed)[0]
    stack = read_stack(source)
    return stack[np.arange(frames) % len(stack)]


def _paced(count: int, fps: float) -> Iterator[int]:
    """Yield 0..count-1, sleeping so that item n comes no earlier than n / fps seconds."""
    start = time.monotonic()
    for n in range(count):
        time.sleep(max(0.0, start + n / fps - time.monotonic()))
        yield n


def play_to_zmq(
    stack: np.ndarray,
    sender: FrameSender,
    acquisition: str,
    fps: float,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Send every frame of `stack` at `fps`, then the end marker."""
    for t in _paced(len(stack), fps):
        sender.send_frame(acquisition, t, stack[t])
        progress(1)
    sender.end(acquisition, frames=len(stack))


def play_to_folder(
    stack: np.ndarray,
    folder: Path,
    acquisition: str,
    fps: float,
    frames_per_file: int = 1,
    pieces: int = 4,
    progress: Callable[[int], None] = lambda n: None,
) -> list[Path]:
    """Write `stack` as TIFF files `<folder>/<acquisition>/frame_000000.tif`, ...

    Each file holds `frames_per_file` frames and is written in `pieces` parts spread over its
    share of the frame period, like a camera streaming to disk. Returns the files written.
    """
    target = folder / acquisition
    target.mkdir(parents=True, exist_ok=True)
    written = []
    starts = range(0, len(stack), frames_per_file)
    period = frames_per_file / fps
    for n in _paced(len(starts), 1 / period):
        first = starts[n]
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, stack[first : first + frames_per_file], photometric="minisblack")
        content = buffer.getvalue()
        path = target / f"frame_{first:06d}.tif"
        step = -(-len(content) // pieces)
        with path.open("wb") as file:
            for offset in range(0, len(content), step):
                file.write(content[offset : offset + step])
                file.flush()
                time.sleep(period / (2 * pieces))
        written.append(path)
        progress(len(stack[first : first + frames_per_file]))
    return written
