"""A clean stop leaves every array exactly as long as its stored frames, with real processes:
`pn2v-live serve` is SIGKILLed twice while frames stream in (leaving arrays grown past their
frames), restarted, streamed more frames, then stopped with SIGTERM while its acquisitions are
still open (no end marker). Afterwards the raw and denoised arrays hold exactly the stored
frames, and ome-zarr-py and dask read exactly those frames, bit-identical."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from conftest import free_port
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from serve_files import CPU_WITHOUT_TRAINING, listeners, save_camera_noise_model

from pn2v_live.storage.ledger import LEDGER_FILE
from pn2v_live.storage.store import Store
from pn2v_live.wire.sender import FrameSender

CLI = Path(sys.executable).with_name("pn2v-live")
SHAPE = (48, 40)
FRAMES = {"a": 400, "b": 100}  # "a" streams across the kills; "b" is never touched after one
FPS = 150

pytestmark = pytest.mark.timeout(600)


class Serve:
    """`pn2v-live serve` storing only (no training: the first model would need more frames than
    ever arrive), on fixed ports across restarts."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.root = folder / "store"
        port = free_port(pairs=True)
        self.frames, self.status = f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{port + 1}"
        save_camera_noise_model(folder / "nm.pt", white=4095)
        self.config = folder / "serve.toml"
        self.config.write_text(
            f"""
[store]
root = "store"
[noise_model]
path = "nm.pt"
refine = false
[ingest.zmq]
bind = "{self.frames}"
status_bind = "{self.status}"
{CPU_WITHOUT_TRAINING}{listeners()}"""
        )
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def log(self) -> Path:
        return self.folder / f"serve-{self.starts}.log"

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.folder.glob("serve-*.log")))

    def start(self) -> None:
        self.starts += 1
        with self.log().open("wb") as log:
            self.process = subprocess.Popen(
                [CLI, "serve", "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while "serving store" not in self.log().read_text():
            assert self.process.poll() is None and time.monotonic() < deadline, self.logs()
            time.sleep(0.1)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def stored(root: Path, name: str) -> int:
    """Frames of `name` the ledger holds, read as any other process would (WAL allows it)."""
    try:
        with sqlite3.connect(root / LEDGER_FILE, timeout=10) as db:
            query = "SELECT count(*) FROM frames WHERE acquisition = ?"
            return db.execute(query, (name,)).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def array_length(root: Path, name: str, image: str) -> int:
    return json.loads((root / f"{name}.ome.zarr" / image / "0" / ".zarray").read_text())["shape"][0]


def kill_while_streaming(serve: Serve, name: str, more_than: int) -> dict[str, tuple[int, int]]:
    """SIGKILL once the ledger holds more than `more_than` frames of `name`, restart; returns
    the (raw array length, stored frames) the kill left for each acquisition."""
    deadline = time.monotonic() + 120
    while stored(serve.root, name) <= more_than:
        assert time.monotonic() < deadline, serve.logs()
        time.sleep(0.01)
    serve.kill()
    left = {n: (array_length(serve.root, n, "raw"), stored(serve.root, n)) for n in FRAMES}
    serve.start()
    return left


def test_sigterm_after_sigkills_and_a_restart_leaves_arrays_as_long_as_their_frames(tmp_path):
    rng = np.random.default_rng(3)
    movies = {
        n: rng.integers(0, 4096, (count, *SHAPE), dtype=np.uint16) for n, count in FRAMES.items()
    }
    serve = Serve(tmp_path)
    serve.start()
    try:
        with FrameSender(serve.frames, serve.status) as sender:

            def stream() -> None:  # "b" at once, then "a" paced: the writers never fall idle
                sender.send_stack("b", movies["b"])
                sender.send_stack("a", movies["a"], range(300), fps=FPS)

            feeding = threading.Thread(target=stream)
            feeding.start()
            first = kill_while_streaming(serve, "a", 60)
            second = kill_while_streaming(serve, "a", first["a"][1] + 30)
            feeding.join(120)
            print("(array length, stored frames) after each kill:", first, second)
            grown = [
                n
                for kill in (first, second)
                for n, (length, count) in kill.items()
                if length > count
            ]
            assert grown, "no kill left an array grown past its frames: nothing was tested"
            sender.ensure_stored("b", movies["b"], timeout=120)
            sender.ensure_stored("a", movies["a"][:300], timeout=120)
            sender.send_stack("a", movies["a"], range(300, FRAMES["a"]), fps=FPS)  # stream more
            sender.ensure_stored("a", movies["a"], timeout=120)
        assert serve.stop() == 0, serve.logs()
    finally:
        if serve.process.poll() is None:
            serve.kill()

    for name, movie in movies.items():
        count = stored(serve.root, name)
        assert count == len(movie)
        for image in ("raw", "denoised"):
            assert array_length(serve.root, name, image) == count, (name, image, serve.logs())
        nodes = list(Reader(parse_url(str(serve.root / f"{name}.ome.zarr" / "raw")))())
        assert nodes[0].data[0].shape == (count, 1, 1, *SHAPE)
        np.testing.assert_array_equal(np.asarray(nodes[0].data[0])[:, 0, 0], movie)
        raw = da.from_zarr(str(serve.root / f"{name}.ome.zarr" / "raw" / "0"))
        denoised = da.from_zarr(str(serve.root / f"{name}.ome.zarr" / "denoised" / "0"))
        assert raw.shape[0] == denoised.shape[0] == count
        np.testing.assert_array_equal(raw[:, 0, 0].compute(), movie)
        acquisition = Store(serve.root).acquisition(name)
        assert acquisition.stored_frames() == list(range(count))
        assert acquisition.valid_t == count and not acquisition.closed
