"""Timing with warm-up and repeats, and peak memory while a piece of work runs."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch


class PeakMemory:
    """Peak resident memory (MB) of this process, sampled every `interval` s inside the block;
    on CUDA also torch's peak allocated GPU memory."""

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.device.type == "cuda":
            self.peak_gpu_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_rss_mb = max(self.peak_rss_mb, process.memory_info().rss / 2**20)
            if self._stop.wait(self.interval):
                return


def timed(
    work: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Run `work` `warmup` times untimed, then `repeats` times; median/min seconds, peak memory."""
    for _ in range(warmup):
        work()
    seconds = []
    with PeakMemory(device) as memory:
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            work()
            _synchronize(device)
            seconds.append(time.perf_counter() - start)
    result = {
        "median_s": round(statistics.median(seconds), 4),
        "min_s": round(min(seconds), 4),
        "peak_rss_mb": round(memory.peak_rss_mb, 1),
    }
    if memory.peak_gpu_mb is not None:
        result["peak_gpu_mb"] = round(memory.peak_gpu_mb, 1)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_facts(device: torch.device) -> dict[str, Any]:
    """Device name, torch threads and dtype, for every bench line."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": device.type, "device_name": name, "torch_threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({psutil.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({psutil.cpu_count()} cores)"
