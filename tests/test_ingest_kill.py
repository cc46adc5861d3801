"""Crash safety with real processes: `pn2v-live ingest` is SIGKILLed at random moments while
frames stream in (ZeroMQ) or files appear (folder); after restarts every frame is stored
exactly once, bit-identical, in order."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from conftest import free_port

from pn2v_live.storage.ledger import LEDGER_FILE
from pn2v_live.storage.store import Store
from pn2v_live.wire.sender import FrameSender

FRAMES = 500
SHAPE = (64, 64)
KILLS = 3


def movie() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 65535, (FRAMES, *SHAPE), dtype=np.uint16)


class Receiver:
    """`pn2v-live ingest ARGS` as a child process that can be killed and restarted."""

    def __init__(self, root: Path, args: list[str]) -> None:
        self.root, self.args, self.process, self.starts = root, args, None, 0

    def start(self) -> None:
        self.starts += 1
        log = (self.root.parent / f"receiver-{self.starts}.log").open("wb")
        command = "from pn2v_live.service.cli import main; main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", command, "ingest", "--data", str(self.root), *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM once it runs (a process still importing just dies); it must exit cleanly."""
        log = self.root.parent / f"receiver-{self.starts}.log"
        deadline = time.monotonic() + 60
        while "ingesting into" not in log.read_text():
            assert time.monotonic() < deadline and self.process.poll() is None, self.logs()
            time.sleep(0.05)
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(60) == 0, self.logs()

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.root.parent.glob("receiver-*.log")))


def stored_count(root: Path) -> int:
    """Frames the ledger holds, read like any other process would (WAL allows it)."""
    if not (root / LEDGER_FILE).exists():
        return 0
    try:
        with sqlite3.connect(root / LEDGER_FILE, timeout=10) as db:
            return db.execute("SELECT count(*) FROM frames").fetchone()[0]
    except sqlite3.OperationalError:  # the receiver is still creating the tables
        return 0


def kill_at_random_moments(receiver: Receiver, rng: random.Random) -> list[int]:
    """KILLS times: once the receiver is storing again, wait a random 0-0.6 s, SIGKILL it and
    start it again. Returns the stored count at each kill."""
    counts = []
    for _ in range(KILLS):
        before = stored_count(receiver.root)
        deadline = time.monotonic() + 60
        while stored_count(receiver.root) == before < FRAMES:
            assert time.monotonic() < deadline, receiver.logs()
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        counts.append(stored_count(receiver.root))
        receiver.kill()
        receiver.start()
    return counts


def assert_stored_once_and_identical(root: Path, name: str, data: np.ndarray) -> None:
    store = Store(root)
    acquisition = store.acquisition(name)
    assert acquisition.stored_frames() == list(range(FRAMES))
    stored = np.stack([acquisition.read_raw(t) for t in range(FRAMES)])
    np.testing.assert_array_equal(stored, data)
    raw = root / f"{name}.ome.zarr" / "raw" / "0"
    chunks = {p.relative_to(raw).as_posix() for p in raw.rglob("*") if p.is_file()}
    chunks = {c for c in chunks if not c.startswith(".z")}
    assert chunks == {f"{t}/0/0/0/0" for t in range(FRAMES)}, "stray chunk files"
    store.close()


def survive_kills(receiver: Receiver, feed: Callable[[], None], settle: Callable[[], None]):
    """Start the receiver, run `feed` in a thread while killing the receiver at random moments,
    then `settle` (assert everything arrived) and stop the receiver cleanly."""
    seed = random.randrange(1 << 30)
    print(f"kill-moment seed {seed}")
    receiver.start()
    try:
        feeding = threading.Thread(target=feed)
        feeding.start()
        counts = kill_at_random_moments(receiver, random.Random(seed))
        feeding.join(150)
        settle()
        receiver.stop()
    finally:
        if receiver.process.poll() is None:
            receiver.kill()
    print("stored at each kill:", counts)
    assert any(0 < n < FRAMES for n in counts), f"no kill hit mid-stream: {counts}"


def test_zmq_receiver_killed_repeatedly_stores_every_frame_once(tmp_path):
    data = movie()
    frames_at, status_at = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    receiver = Receiver(tmp_path / "store", ["--zmq", frames_at, "--status", status_at])
    outcome = []

    def stream() -> None:
        """Play the movie, then resend whatever the crashes lost until all is stored."""
        with FrameSender(frames_at, status_at) as sender:
            sender.send_stack("stream", data, fps=120)
            sender.ensure_stored("stream", data, timeout=120)
            sender.end("stream", frames=FRAMES)
        outcome.append("all stored")

    def settle() -> None:
        assert outcome == ["all stored"], receiver.logs()

    survive_kills(receiver, stream, settle)
    assert_stored_once_and_identical(tmp_path / "store", "stream", data)


def write_files(folder: Path, data: np.ndarray, fps: float) -> None:
    """Files of 1-5 frames, each written in two pieces, like a camera streaming to disk."""
    sizes = [1, 3, 1, 5, 2, 4]
    first, n = 0, 0
    start = time.monotonic()
    while first < FRAMES:
        count = min(sizes[n % len(sizes)], FRAMES - first)
        path = folder / f"img_{n:04d}.tif"
        tifffile.imwrite(
            path.with_suffix(".bin"), data[first : first + count], photometric="minisblack"
        )
        content = path.with_suffix(".bin").read_bytes()
        path.with_suffix(".bin").unlink()
        with path.open("wb") as file:
            file.write(content[: len(content) // 2])
            file.flush()
            time.sleep(0.01)
            file.write(content[len(content) // 2 :])
        first, n = first + count, n + 1
        time.sleep(max(0.0, start + first / fps - time.monotonic()))


def test_folder_receiver_killed_repeatedly_stores_every_frame_once(tmp_path):
    data = movie()
    watched = tmp_path / "scope"
    (watched / "timelapse").mkdir(parents=True)
    root = tmp_path / "store"
    receiver = Receiver(root, ["--folder", str(watched), "--stable-seconds", "0.3"])

    def settle() -> None:
        deadline = time.monotonic() + 90
        while stored_count(root) < FRAMES:
            assert time.monotonic() < deadline, receiver.logs()
            time.sleep(0.2)

    survive_kills(receiver, lambda: write_files(watched / "timelapse", data, 120), settle)
    assert_stored_once_and_identical(root, "timelapse", data)
