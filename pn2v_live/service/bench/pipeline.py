"""End-to-end inference throughput: frames already in a store → dask-scheduled MMSE → denoised
twins written, through the daemon's real inference stage."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.service.bench.algorithm import synthetic_setup
from pn2v_live.service.bench.measure import PeakMemory
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store


def run_pipeline(
    size: int, frames: int, k: int, device: torch.device, max_in_flight: int = 1
) -> dict[str, Any]:
    """Store `frames` size×size frames, start inference with an (untrained) K-sample model, and
    time until every frame has its denoised twin."""
    denoiser, noise_model, frame = synthetic_setup(size, k, torch.device("cpu"))
    raw = np.clip(np.rint(frame), 0, 65535).astype(np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "data", writer=True)
        acquisition = store.create("bench", raw.shape, raw.dtype)
        for t in range(frames):
            acquisition.write_raw(t, np.roll(raw, t, axis=1))
        registry = ModelRegistry(Path(tmp) / "models")
        registry.promote(
            denoiser, validation_loss=None, training_frames=0, training_steps=0,
            noise_model_id=None, source="bench",
        )  # fmt: skip
        stage = InferenceScheduler(
            store, registry, noise_model.to(device), device, max_in_flight=max_in_flight
        )
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            stage.start()
            while acquisition.frames_to_denoise(1):
                time.sleep(0.01)
            seconds = time.perf_counter() - started
            stage.stop()
        store.close()
    return {
        "frames": frames,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 3),
        "peak_rss_mb": round(memory.peak_rss_mb, 1),
        "max_in_flight": max_in_flight,
        "dtype": str(raw.dtype),
    }
