"""The Micro-Manager example's image processor, called the way pycro-manager calls it (a numpy
image and Micro-Manager's metadata dict), against a real ZeroMQ receiver and store: frames
arrive bit-identical with pixel size and interval, and a slow or absent receiver never makes it
hold more than its bounded queue, nor lose a frame."""

from __future__ import annotations

import importlib.util
import logging
import socket
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pn2v_live.pipeline.zmq_source import ZmqSource
from pn2v_live.storage.physical import Physical
from pn2v_live.storage.store import Store
from pn2v_live.wire.sender import FrameSender

EXAMPLE = (
    Path(__file__).resolve().parent.parent / "service" / "examples" / "pycromanager_forward.py"
)
SHAPE = (64, 96)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("pycromanager_forward", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # pycromanager itself is only imported by main()
    return module


def frame_at(t: int, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    rng = np.random.default_rng(t)
    return rng.integers(0, 65535, shape, dtype=np.uint16)


def metadata_at(t: int) -> dict:
    """What Micro-Manager hands pycro-manager's image processor for time point t (0.5 s apart,
    with the clock's offset at the start; values as Micro-Manager writes them)."""
    return {
        "Axes": {"time": t},
        "PixelSizeUm": 0.065,
        "ElapsedTime-ms": 12.0 + 500.0 * t,
        "PixelType": "GRAY16",
        "Width": SHAPE[1],
        "Height": SHAPE[0],
        "Camera": "Camera",
        "Exposure-ms": 20.0,
    }


def stored_frames(root: Path, name: str, count: int) -> np.ndarray:
    store = Store(root)
    acquisition = store.acquisition(name)
    frames = np.stack([acquisition.read_raw(t) for t in range(count)])
    physical = acquisition.physical
    store.close()
    return frames, physical


def test_frames_arrive_bit_identical_with_pixel_size_and_interval(example, tmp_path) -> None:
    source = ZmqSource(Store(tmp_path), "tcp://127.0.0.1:*")
    source.start()
    try:
        with FrameSender(source.bind, source.status_bind) as sender:
            forward = example.Forwarder(sender, "mm01")
            for t in range(6):
                image, metadata = frame_at(t), metadata_at(t)
                returned = forward(image, metadata)
                assert returned[0] is image and returned[1] is metadata  # Micro-Manager saves it
            forward.finish()
            sender.ensure_stored("mm01", [frame_at(t) for t in range(6)], timeout=30)
            sender.end("mm01", frames=6, confirm_timeout=10)
        assert forward.forwarded == 6 and forward.not_forwarded == []
    finally:
        source.stop()
    frames, physical = stored_frames(tmp_path, "mm01", 6)
    np.testing.assert_array_equal(frames, [frame_at(t) for t in range(6)])
    assert physical == Physical(pixel_size_um=(0.065, 0.065), interval_s=0.5)


def test_an_uncalibrated_single_frame_carries_no_sizes(example, tmp_path) -> None:
    source = ZmqSource(Store(tmp_path), "tcp://127.0.0.1:*")
    source.start()
    try:
        with FrameSender(source.bind, source.status_bind) as sender:
            forward = example.Forwarder(sender, "one")
            forward(frame_at(0), metadata_at(0) | {"PixelSizeUm": "0.0"})
            forward.finish()  # the held first frame goes without a second one
            sender.ensure_stored("one", [frame_at(0)], timeout=30)
    finally:
        source.stop()
    frames, physical = stored_frames(tmp_path, "one", 1)
    np.testing.assert_array_equal(frames[0], frame_at(0))
    assert not physical.known


def test_other_planes_are_refused_not_stored_as_time_points(example) -> None:
    with FrameSender("tcp://127.0.0.1:9", send_timeout=0) as sender:
        forward = example.Forwarder(sender, "planes")
        forward(frame_at(0), metadata_at(0) | {"Axes": {"time": 0, "channel": "GFP"}})
        with pytest.raises(ValueError, match="single-channel, single-plane"):
            forward(frame_at(0), metadata_at(0) | {"Axes": {"time": 0, "channel": "RFP"}})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_absent_receiver_bounds_memory_and_loses_nothing(example, tmp_path, caplog) -> None:
    """No receiver for 200 frames of 128 KiB (25 MiB): the processor waits once, holds at most
    its queue, counts the rest; a receiver started later gets the queued frames, new ones live,
    and the resend from the saved data completes the acquisition."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    shape, queue, absent = (256, 256), 4, 200
    frame_bytes = shape[0] * shape[1] * 2
    caplog.set_level(logging.WARNING, logger="pycromanager_forward")
    with FrameSender(endpoint, high_water_mark=queue) as sender:
        forward = example.Forwarder(sender, "mm02", wait_s=0.3)
        started = time.monotonic()
        for t in range(absent):  # each frame made here and dropped by the caller, as in MM
            if t == 10:  # the queue is full by now: from here on, what it holds must not grow
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
            forward(frame_at(t, shape), metadata_at(t))
        took = time.monotonic() - started
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert took < 0.3 + 5  # one wait of 0.3 s; then no waiting while the queue is full
        assert grown < frame_bytes  # 190 frames (24 MiB) more, not one frame's worth held
        assert forward.forwarded <= queue + 1
        assert forward.forwarded + len(forward.not_forwarded) == absent
        [warning] = caplog.messages
        assert "took no frame for 0.3 s" in warning and "resent" in warning

        source = ZmqSource(Store(tmp_path), endpoint)
        source.start()
        try:
            deadline = time.monotonic() + 20
            while (sender.status("mm02") or {}).get("valid_t", 0) < forward.forwarded:
                assert time.monotonic() < deadline, "the queued frames never arrived"
                time.sleep(0.05)
            missed = len(forward.not_forwarded)
            for t in range(absent, absent + 10):  # the receiver is back: forwarded live
                forward(frame_at(t, shape), metadata_at(t))
            assert len(forward.not_forwarded) == missed
            assert "takes frames again" in caplog.messages[-1]
            forward.finish()
            saved = example.SavedFrames(lambda t: frame_at(t, shape), forward.frames)
            sender.ensure_stored("mm02", saved, timeout=60, physical=forward.physical)
            sender.end("mm02", frames=len(saved), confirm_timeout=10)
        finally:
            source.stop()
    frames, physical = stored_frames(tmp_path, "mm02", absent + 10)
    np.testing.assert_array_equal(frames, [frame_at(t, shape) for t in range(absent + 10)])
    assert physical == Physical(pixel_size_um=(0.065, 0.065), interval_s=0.5)
