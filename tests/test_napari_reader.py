"""A live store opens with ome-zarr-py's reader (what napari-ome-zarr uses) while it grows."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader

from pn2v_live.storage.store import Store

FRAME_SHAPE = (24, 40)
FRAMES = 60
PAUSES = (20, 40)  # the writer waits here until the reader has seen the frames before


def frame_at(t: int) -> np.ndarray:
    return (np.arange(np.prod(FRAME_SHAPE)).reshape(FRAME_SHAPE) * 7 + 1000 * t).astype(np.uint16)


def append_frames(store: Store, caught_up: dict[int, threading.Event]) -> None:
    acquisition = store.create("napari01", FRAME_SHAPE, "uint16")
    for t in range(FRAMES):
        if t in caught_up:
            caught_up[t].wait(30)
        acquisition.write_raw(t, frame_at(t))
        acquisition.write_denoised(t, frame_at(t).astype(np.float32) / 2, model_version=1)
        threading.Event().wait(0.01)


def open_image(path: Path):
    """The one multiscale image node ome-zarr-py finds at `path`."""
    [node] = list(Reader(parse_url(str(path)))())
    assert isinstance(node.specs[0], Multiscales)
    return node


def test_reader_opens_raw_and_denoised_while_frames_are_appended(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    caught_up = {t: threading.Event() for t in PAUSES}
    writer = threading.Thread(target=append_frames, args=(store, caught_up))
    writer.start()
    path = tmp_path / "store" / "napari01.ome.zarr"
    seen = set()
    try:
        while True:
            finished = not writer.is_alive()  # one more full read after the last frame
            # valid_t first: the arrays grow before valid_t counts a frame, never after.
            attrs = zarr.open_group(path, mode="r").attrs if (path / "raw").is_dir() else {}
            if "pn2v_live" not in attrs:  # the acquisition is still being created
                continue
            valid_t = attrs["pn2v_live"]["valid_t"]
            raw = open_image(path / "raw")
            assert [axis["name"] for axis in raw.metadata["axes"]] == ["t", "c", "z", "y", "x"]
            data = raw.data[0]
            assert data.dtype == np.uint16 and data.shape[0] >= valid_t
            assert data.shape[1:] == (1, 1, *FRAME_SHAPE)
            frames = np.asarray(data[:valid_t, 0, 0])
            for t in range(valid_t):
                np.testing.assert_array_equal(frames[t], frame_at(t))
            seen.add(valid_t)
            for t, event in caught_up.items():
                if valid_t >= t:
                    event.set()
            if finished:
                break
    finally:
        writer.join()
        store.close()
    assert {20, 40, FRAMES} <= seen  # read mid-acquisition at each pause, then complete
    denoised = open_image(path / "denoised")
    assert denoised.data[0].dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(denoised.data[0][:FRAMES, 0, 0]),
        [frame_at(t).astype(np.float32) / 2 for t in range(FRAMES)],
    )
