"""ZeroMQ PUB of denoised frames: a real SUB socket gets exactly what the store holds."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq

from pn2v_live.errors import UserError
from pn2v_live.pipeline.publisher import DenoisedPublisher
from pn2v_live.storage.store import Store
from pn2v_live.wire.protocol import FrameMessage, decode_message

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FRAME_SHAPE = (32, 48)


@pytest.fixture()
def acquisition(tmp_path: Path):
    """An acquisition whose denoised frames are random float32 (every bit pattern matters)."""
    store = Store(tmp_path / "store")
    acquisition = store.create("pub01", FRAME_SHAPE, "uint16")
    rng = np.random.default_rng(1)
    for t in range(6):
        acquisition.write_raw(t, rng.integers(0, 4000, FRAME_SHAPE, dtype=np.uint16))
        acquisition.write_denoised(t, rng.normal(500, 80, FRAME_SHAPE).astype(np.float32), 4)
    yield acquisition
    store.close()


@pytest.fixture()
def publisher():
    publisher = DenoisedPublisher("tcp://127.0.0.1:*")
    publisher.start()
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", publisher.bind), "the port really bound"
    yield publisher
    publisher.stop()


def test_subscriber_receives_denoised_frames_bit_identical_to_the_store(
    acquisition, publisher
) -> None:
    subscriber = zmq.Context.instance().socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.setsockopt(zmq.RCVTIMEO, 5000)
    subscriber.connect(publisher.bind)
    # A PUB drops messages until the subscription has arrived: send frame 0 until one gets in.
    while not subscriber.poll(100):
        publisher.publish(acquisition, 0, acquisition.read_denoised(0), 4)
    while subscriber.poll(200):  # drain the extra copies of frame 0
        subscriber.recv_multipart()
    for t in range(1, 6):
        publisher.publish(acquisition, t, acquisition.read_denoised(t), 3 + t)
    for t in range(1, 6):
        message = decode_message(subscriber.recv_multipart())
        assert isinstance(message, FrameMessage)
        assert (message.acquisition, message.index, message.model_version) == ("pub01", t, 3 + t)
        stored = acquisition.read_denoised(t)
        assert message.pixels.dtype == np.float32 and message.pixels.shape == FRAME_SHAPE
        assert message.pixels.tobytes() == stored.tobytes()
    subscriber.close()


def test_example_subscriber_prints_and_saves_the_frames(acquisition, publisher, tmp_path) -> None:
    example = PROJECT_ROOT / "service" / "examples" / "subscribe_denoised.py"
    process = subprocess.Popen(
        [sys.executable, str(example), publisher.bind, "--acquisition", "pub01"]
        + ["--count", "3", "--save", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            for t in range(3):  # the subscriber may join late; it keeps the first 3 it sees
                publisher.publish(acquisition, t, acquisition.read_denoised(t), 4)
            time.sleep(0.05)
        output = process.communicate(timeout=10)[0]
    finally:
        process.kill()
    assert process.returncode == 0
    lines = output.splitlines()
    assert len(lines) == 3 and all(
        line.startswith("pub01 t=") and " model v4 " in line for line in lines
    )
    saved = sorted((tmp_path / "out").glob("pub01_*.tif"))
    assert len(saved) == 3
    for path in saved:
        t = int(path.stem.split("_")[1])
        np.testing.assert_array_equal(tifffile.imread(path), acquisition.read_denoised(t))


def test_taken_address_is_a_clear_user_error(publisher) -> None:
    with pytest.raises(UserError, match="cannot publish denoised frames on tcp://127.0.0.1"):
        DenoisedPublisher(publisher.bind).start()
