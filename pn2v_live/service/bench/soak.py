"""A soak run of the real daemon: does it hold its memory, files and queues over a long stream?

`pn2v-live serve` runs in a subprocess (what users run) on a temporary store with the shipped
defaults plus the user's `--set` overrides, training on, as in `bench --part live`. Synthetic
camera frames (a tiled cell scene through the Poisson–Gaussian camera of `bench --part ingest`,
a pool of POOL_FRAMES frames sent in turn) stream to it over ZeroMQ by `FrameSender` at a fixed
rate for M minutes, as a new acquisition every ACQUISITION_SECONDS of frames, each ended with
its end marker as a microscope does (so per-acquisition state is exercised, not only one
growing array). The noise model is that camera's own (Poisson–Gaussian with its gain, offset and
read noise) unless one is given.

Every SAMPLE_SECONDS from the first frame sent (offset by half a frame interval, at most half a
second, so that a sample never falls on the instant a frame is sent), the daemon is sampled:
resident memory (RSS), open files (/proc/PID/fd), threads, and from its /metrics endpoint the
inference backlog (`pn2v_live_backlog_frames`) and the receive queue's fill
(`pn2v_live_receive_queue_bytes`).
After M minutes the sender stops, makes sure every frame it sent is stored (resending any
missing), and the daemon gets SIGTERM; the ledger it leaves says how many frames were stored and
denoised.

The result gives start, end and max of each sampled series, and for RSS the least-squares slope
over the samples after the warm-up (the first minute, or a third of a shorter run) in MB per
hour, and the growth over that stretch in percent of the fitted value where it starts. Where the
first model comes later than that (training it takes minutes on a few CPU cores), inference
starts then and adds its working set (the network's activations, the compiled MMSE kernel) as
one step: the same slope and growth are also given from a minute after the first model was
served (`pn2v_live_model_version` sampled too), the daemon's steady state, when there are at
least STEADY_MIN_SECONDS of samples after it.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pn2v_live.errors import UserError
from pn2v_live.service.bench import daemon_process
from pn2v_live.service.bench.daemon_metrics import metrics_url, read_metrics, total
from pn2v_live.service.bench.daemon_process import SEND_TIMEOUT_S
from pn2v_live.service.bench.store_watch import ModelWatcher

if TYPE_CHECKING:
    from pn2v_live.wire.sender import FrameSender

SAMPLE_SECONDS = 1.0
WARMUP_SECONDS = 60.0  # samples before this are left out of the RSS slope and growth
ACQUISITION_SECONDS = 60.0  # a new acquisition per minute of frames
POOL_FRAMES = 16  # distinct frames, sent in turn
STORE_TIMEOUT_S = 300.0  # after the stream: every frame stored (the backlog of writes drains)
ACQUISITION = "soak-{:04d}"
SERIES = ("rss_mb", "open_files", "threads", "backlog_frames", "receive_queue_bytes")
STEADY_AFTER_MODEL_S = 60.0  # steady state: this long after the first model is served
STEADY_MIN_SECONDS = 60.0  # fewer seconds of samples than this give no steady-state trend
METRICS = {
    "backlog_frames": "pn2v_live_backlog_frames",
    "receive_queue_bytes": "pn2v_live_receive_queue_bytes",
    "model_version": "pn2v_live_model_version",
}

Log = Callable[[str], None]


# ---- what is sent ----------------------------------------------------------------------


class Cycled(Sequence):
    """`length` frames cycling through `pool` (T, Y, X): frame t is pool[t % len(pool)]."""

    def __init__(self, pool: np.ndarray, length: int):
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, t: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= t < self.length:
            raise IndexError(t)
        return self.pool[t % len(self.pool)]


def frame_pool(size: int, count: int = POOL_FRAMES) -> np.ndarray:
    """`count` (size, size) uint16 frames of the ingest bench's camera (same seed: a reader can
    make them again to compare with what was stored)."""
    from pn2v_live.service.bench.ingest import camera_frames

    return camera_frames(size, "uint16", count)


def camera_noise_model(path: Path, pool: np.ndarray) -> Path:
    """The Poisson–Gaussian noise model of the camera that made `pool`, saved at `path`."""
    from pn2v_live.core import synthetic
    from pn2v_live.core.noise import PoissonGaussianNoiseModel
    from pn2v_live.storage.noise_model_file import save_noise_model

    camera = synthetic.Camera()
    signal_range = (camera.offset, float(pool.max()))
    model = PoissonGaussianNoiseModel(camera.gain, camera.offset, camera.read_noise, signal_range)
    return save_noise_model(model, path)


class Stream(daemon_process.SenderThread):
    """Sends frames at `fps` until `stop` is set: acquisition k gets `per_acquisition` frames
    (frame numbers 0..n-1) and its end marker, then k + 1 starts. Once stopped, resends what the
    receiver lacks until all is stored. `sent` maps each acquisition to the frames sent."""

    def __init__(
        self,
        endpoints: daemon_process.Endpoints,
        pool: np.ndarray,
        fps: float,
        per_acquisition: int,
    ):
        super().__init__("bench-soak-stream", endpoints)
        self.pool, self.fps = pool, fps
        self.per_acquisition = per_acquisition
        self.stop = threading.Event()
        self.sent: dict[str, int] = {}

    def send(self, sender: FrameSender) -> None:
        self._stream(sender)
        for name, count in self.sent.items():
            sender.ensure_stored(name, Cycled(self.pool, count), timeout=STORE_TIMEOUT_S)

    def _stream(self, sender: FrameSender) -> None:
        n = 0
        while not self.stop.is_set():
            wait = self.started_at + n / self.fps - time.monotonic()
            if wait > 0 and self.stop.wait(wait):
                break
            k, t = divmod(n, self.per_acquisition)
            name = ACQUISITION.format(k)
            sender.send_frame(name, t, self.pool[n % len(self.pool)])
            self.sent[name] = t + 1
            if t + 1 == self.per_acquisition:
                sender.end(name, self.per_acquisition)
            n += 1
        last = ACQUISITION.format(n // self.per_acquisition) if n else None
        if last in self.sent and self.sent[last] < self.per_acquisition:
            sender.end(last, self.sent[last])  # the acquisition the stop cut short


# ---- what is sampled -------------------------------------------------------------------


@dataclass
class Samples:
    """One row per sample: seconds since the first frame sent, then each of SERIES (None where
    the metrics endpoint did not answer)."""

    rows: list[dict[str, float | None]] = field(default_factory=list)
    metrics_misses: int = 0

    def take(self, pid: int, url: str, t_s: float) -> dict[str, float | None]:
        import psutil

        process = psutil.Process(pid)
        row: dict[str, float | None] = {
            "t_s": round(t_s, 3),
            "rss_mb": process.memory_info().rss / 2**20,
            "open_files": float(process.num_fds()),
            "threads": float(process.num_threads()),
        }
        try:
            samples = read_metrics(url)
        except (OSError, ValueError):  # busy or restarting: this sample goes without
            samples = []
        for key, name in METRICS.items():
            row[key] = total(samples, name)
        if any(row[key] is None for key in METRICS):
            self.metrics_misses += 1
        self.rows.append(row)
        return row


def summary(rows: list[dict[str, float | None]], warmup_s: float) -> dict[str, Any]:
    """Start, end and max of each of SERIES (over the samples that have it), and the RSS trend
    after `warmup_s`: slope (MB/h, least squares) and growth (% of the fitted start); the same
    from the steady state on (see the module docstring), with when the first model came."""
    result: dict[str, Any] = {}
    for key in SERIES:
        values = [row[key] for row in rows if row[key] is not None]
        digits = 1 if key == "rss_mb" else 0
        for name, value in (
            ("start", values[0] if values else None),
            ("end", values[-1] if values else None),
            ("max", max(values) if values else None),
        ):
            result[f"{key}_{name}"] = None if value is None else round(value, digits)
    after = [(row["t_s"], row["rss_mb"]) for row in rows if row["t_s"] >= warmup_s]
    slope_per_s, at_warmup, growth = rss_trend(after, warmup_s)
    result |= {
        "rss_mb_per_hour": _rounded(slope_per_s, 1, 3600),
        "rss_mb_fitted_at_warmup": _rounded(at_warmup, 1),
        "rss_growth_after_warmup_pct": _rounded(growth, 2),
    }
    served = [row["t_s"] for row in rows if (row.get("model_version") or 0) >= 1]
    first_model = served[0] if served else None
    steady = None if first_model is None else max(warmup_s, first_model + STEADY_AFTER_MODEL_S)
    slope_per_s = growth = None
    if steady is not None and rows and rows[-1]["t_s"] - steady >= STEADY_MIN_SECONDS:
        points = [(row["t_s"], row["rss_mb"]) for row in rows if row["t_s"] >= steady]
        slope_per_s, _, growth = rss_trend(points, steady)
    return result | {
        "first_model_s": _rounded(first_model, 2),
        "steady_from_s": _rounded(steady, 2),
        "rss_mb_per_hour_steady": _rounded(slope_per_s, 1, 3600),
        "rss_growth_steady_pct": _rounded(growth, 2),
    }


def _rounded(value: float | None, digits: int, scale: float = 1.0) -> float | None:
    return None if value is None else round(value * scale, digits)


def rss_trend(
    points: list[tuple[float, float]], warmup_s: float
) -> tuple[float | None, float | None, float | None]:
    """Least-squares line through (t_s, rss_mb) `points`: its slope (MB/s), its value at
    `warmup_s`, and its rise from there to the last point in percent of that value. Nones with
    fewer than two points."""
    if len(points) < 2:
        return None, None, None
    t, rss = np.array(points, dtype=np.float64).T
    if np.ptp(t) == 0:
        return None, None, None
    slope, intercept = np.polyfit(t, rss, 1)
    at_warmup = slope * warmup_s + intercept
    growth = 100.0 * slope * (t[-1] - warmup_s) / at_warmup if at_warmup > 0 else math.nan
    return float(slope), float(at_warmup), float(growth)


# ---- the whole run ---------------------------------------------------------------------


def run_soak(
    minutes: float,
    fps: float,
    size: int,
    overrides: list[str],
    noise_model: Path | None = None,
    keep: Path | None = None,
    log: Log = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Stream synthetic frames through `pn2v-live serve` for `minutes` at `fps` and sample it
    every second (see the module docstring). Keeps the store, the daemon's log and the samples
    under `keep` (DIR/store, DIR/serve.log, DIR/samples.jsonl) when given. Returns the result's
    keys; one progress line every 10 samples goes to `log`."""
    from pn2v_live.service.config import load_config
    from pn2v_live.storage.noise_model_file import load_noise_model

    if not minutes > 0 or not fps > 0 or size < 16:
        raise UserError("--part soak needs --minutes > 0, --fps > 0 and --size >= 16")
    if noise_model is not None:
        load_noise_model(noise_model)  # a bad file is the user's: say so before starting
    pool = frame_pool(size)
    with ExitStack() as cleanup:
        sockets, work = daemon_process.work_folders(cleanup, keep, "pn2v-soak-")
        if noise_model is None:
            noise_model = camera_noise_model(work / "noise-model.pt", pool)
        endpoints = daemon_process.Endpoints.in_folder(sockets)
        settings = daemon_process.daemon_overrides(
            work / "store", noise_model, endpoints, overrides, "soak"
        )
        config = load_config(None, settings)  # UserError for a bad --set, before starting
        cleanup.enter_context(daemon_process.sigterm_as_interrupt())
        result = _stream_and_sample(config, settings, endpoints, work, pool, fps, minutes, log)
    return {
        **result,
        "minutes": minutes,
        "fps": fps,
        "frame_shape": list(pool.shape[1:]),
        "dtype": str(pool.dtype),
        "k": config.trainer.k,
        "store": str(work / "store") if keep is not None else None,
    }


def _stream_and_sample(
    config,
    settings: list[str],
    endpoints: daemon_process.Endpoints,
    work: Path,
    pool: np.ndarray,
    fps: float,
    minutes: float,
    log: Log,
) -> dict[str, Any]:
    """Start the daemon, stream and sample for `minutes`, stop it; the result's sample and
    store keys."""
    log_path = work / "serve.log"
    samples = Samples()
    process = daemon_process.start_daemon(settings, log_path)
    try:
        daemon_process.wait_until_ready(process, endpoints, log_path)
        url = metrics_url(log_path)
        per_acquisition = max(1, round(fps * ACQUISITION_SECONDS))
        stream = Stream(endpoints, pool, fps, per_acquisition)
        stream.start()
        stream.started.wait()
        started = stream.started_at or time.monotonic()
        first = {"t_s": 0.0, "event": "first frame sent", "fps": fps, "daemon_log": str(log_path)}
        log(json.dumps(first))
        duration = minutes * 60
        offset = min(0.5 / fps, 0.5 * SAMPLE_SECONDS)
        n = 0
        while n * SAMPLE_SECONDS <= duration + 1e-9:
            time.sleep(max(0.0, started + offset + n * SAMPLE_SECONDS - time.monotonic()))
            if process.poll() is not None:
                raise UserError(f"the daemon exited with code {process.returncode} during the "
                                f"stream:\n{daemon_process.log_tail(log_path)}")  # fmt: skip
            if stream.error is not None:
                raise UserError(f"the stream stopped: {type(stream.error).__name__}: "
                                f"{stream.error}\n{daemon_process.log_tail(log_path)}")  # fmt: skip
            row = samples.take(process.pid, url, time.monotonic() - started)
            if n % 10 == 0:
                log(json.dumps({k: (round(v, 1) if isinstance(v, float) else v)
                                for k, v in row.items()}))  # fmt: skip
            n += 1
        stream.stop.set()
        stream.join(STORE_TIMEOUT_S + SEND_TIMEOUT_S)
        if stream.error is not None or stream.is_alive():
            what = "did not finish" if stream.is_alive() else repr(stream.error)
            raise UserError(f"storing the sent frames {what}:\n{daemon_process.log_tail(log_path)}")
        exit_code = daemon_process.stop_daemon(process)
    finally:
        daemon_process.stop_daemon(process)
        if samples.rows:
            with (work / "samples.jsonl").open("w") as out:
                out.writelines(json.dumps(row) + "\n" for row in samples.rows)
    return {
        **_stored(config.store.root, stream.sent),
        **summary(samples.rows, warmup_s=min(WARMUP_SECONDS, minutes * 60 / 3)),
        "warmup_s": min(WARMUP_SECONDS, minutes * 60 / 3),
        "samples": len(samples.rows),
        "sample_s": SAMPLE_SECONDS,
        "metrics_misses": samples.metrics_misses,
        "frames_sent": sum(stream.sent.values()),
        "acquisitions": len(stream.sent),
        "daemon_exit_code": exit_code,
    }


def _stored(root: Path, sent: dict[str, int]) -> dict[str, Any]:
    """What the stopped daemon's ledger holds of the acquisitions sent: frames stored and
    denoised, and the model version it ended with."""
    from pn2v_live.storage.store import Store

    store = Store(root)
    try:
        stored = sum(len(store.recorded_frames(name)) for name in sent)
        denoised = sum(len(store.recorded_twins(name)) for name in sent)
    finally:
        store.close()
    models = ModelWatcher(root / "models")
    models.poll()
    return {"frames_stored": stored, "frames_denoised": denoised, "model_version": models.current}
