"""Sustained ZeroMQ ingest throughput through the real receiver and store, default compressor."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from pn2v_live.core import synthetic
from pn2v_live.pipeline.zmq_source import ZmqSource
from pn2v_live.storage.store import Store
from pn2v_live.wire.sender import FrameSender

BENCH_PORT = 5575  # frames; status on 5576


def camera_frames(size: int, dtype: str, count: int = 8, seed: int = 0) -> np.ndarray:
    """`count` noisy (size, size) frames of a synthetic cell scene through the simulated camera.

    The scene is made at 256² and tiled (making it at 2048² takes minutes). Compression ratio
    drives throughput, so the bench uses camera-like data, never zeros or uniform noise.
    """
    rng = np.random.default_rng(seed)
    camera = synthetic.Camera(dtype=dtype)
    peak = 240.0 if np.dtype(dtype) == np.uint8 else 3000.0
    tile = synthetic.scene((256, 256), rng, background=camera.offset + 20, peak=peak)
    clean = np.tile(tile, (-(-size // 256), -(-size // 256)))[:size, :size]
    return np.stack([camera.expose(clean, rng) for _ in range(count)])


def run_ingest(size: int, frames: int, dtype: str = "uint16", root: Path | None = None) -> dict:
    """Send `frames` frames of size×size `dtype` as fast as possible; time until all are stored.

    Returns {"frames", "seconds", "frames_per_s", "megabytes_per_s", "size", "dtype",
    "compression_ratio"}. Uses a temporary data root unless `root` is given.
    """
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        store = Store(tmp, writer=True)
        source = ZmqSource(store, f"tcp://127.0.0.1:{BENCH_PORT}")
        source.start()
        pool = camera_frames(size, dtype)
        try:
            with FrameSender(source.bind, source.status_bind) as sender:
                start = time.perf_counter()
                for t in range(frames):
                    sender.send_frame("bench", t, pool[t % len(pool)])
                while source.health()["stored"] < frames:
                    time.sleep(0.005)
                seconds = time.perf_counter() - start
        finally:
            source.stop()
            store.close()
        chunks = Path(tmp, "bench.ome.zarr", "raw", "0")
        on_disk = sum(p.stat().st_size for p in chunks.rglob("*") if p.is_file())
    raw_bytes = frames * pool[0].nbytes
    return {
        "frames": frames,
        "size": size,
        "dtype": dtype,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 1),
        "megabytes_per_s": round(raw_bytes / seconds / 1e6, 1),
        "compression_ratio": round(raw_bytes / on_disk, 2),
    }
