"""`pn2v-live bench --part soak`: the real daemon in its own process, a real stream over ZeroMQ,
and a result line checked against what the store it left holds.

18 s at 5 frames/s of 64² frames, with a tiny training budget (K = 50, 32² patches, 4 per step)
so that a model is usually trained and frames are denoised within the run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pn2v_live.service.bench.daemon_process import start_daemon
from pn2v_live.service.bench.ingest import camera_frames
from pn2v_live.service.bench.soak import POOL_FRAMES, rss_trend, summary
from pn2v_live.storage.ledger import Ledger

CLI = [sys.executable, "-m", "pn2v_live"]
MINUTES, FPS, SIZE = 0.3, 5.0, 64
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
SERIES = ("rss_mb", "open_files", "threads", "backlog_frames", "receive_queue_bytes")
TINY_TRAINING = {
    "trainer.steps_per_round": 10,
    "trainer.k": 50,
    "trainer.patch_size": 32,
    "trainer.batch_size": 4,
    "trainer.every_seconds": 5,
    "trainer.first_model_frames": 8,
    "trainer.first_model_steps": 20,
    "trainer.min_gain_db": -100,
    "trainer.device": '"cpu"',
    "inference.device": '"cpu"',
    "inference.compile": "false",
}


@pytest.mark.slow
def test_soak_reports_what_the_daemon_did(tmp_path):
    keep = tmp_path / "soak"
    settings = [arg for key, value in TINY_TRAINING.items() for arg in ("--set", f"{key}={value}")]
    command = [*CLI, "bench", "--part", "soak", "--minutes", str(MINUTES), "--fps", str(FPS),
               "--size", str(SIZE), "--keep", str(keep), *settings]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1, run.stdout
    result = json.loads(lines[0])
    assert result["part"] == "soak" and result["frame_shape"] == [SIZE, SIZE]

    # One sample a second from the first frame to the end, each on file with its time.
    rows = [json.loads(line) for line in (keep / "samples.jsonl").read_text().splitlines()]
    assert result["samples"] == len(rows) == int(MINUTES * 60) + 1
    times = [row["t_s"] for row in rows]
    # On schedule (a sample that is late, e.g. waiting for a busy /metrics, is followed by one
    # on time): increasing, about a second apart on average.
    assert times[0] < 1.0 and MINUTES * 60 <= times[-1] < MINUTES * 60 + 4
    assert all(0 < b - a < 5 for a, b in zip(times, times[1:], strict=False))
    assert (times[-1] - times[0]) / (len(times) - 1) == pytest.approx(1.0, abs=0.25)

    # Every reported figure is a finite number, and start/end/max agree with the samples.
    for key in SERIES:
        values = [row[key] for row in rows if row[key] is not None]
        assert len(values) >= len(rows) - result["metrics_misses"]
        for name in ("start", "end", "max"):
            assert math.isfinite(result[f"{key}_{name}"]), key
        assert result[f"{key}_max"] == pytest.approx(max(values), abs=0.06)
        assert result[f"{key}_start"] <= result[f"{key}_max"] >= result[f"{key}_end"]
    for key in ("rss_mb_per_hour", "rss_growth_after_warmup_pct", "rss_mb_fitted_at_warmup"):
        assert math.isfinite(result[key]), key
    served = [row["t_s"] for row in rows if (row["model_version"] or 0) >= 1]
    assert result["first_model_s"] == (pytest.approx(served[0], abs=0.005) if served else None)
    # 18 s leave no minute after the first model: no steady-state trend, rather than a noisy one
    assert result["rss_mb_per_hour_steady"] is None and result["rss_growth_steady_pct"] is None
    assert result["rss_mb_start"] > 50 and result["rss_mb_max"] < 16_000  # a real Python process
    assert result["open_files_start"] >= 3 and result["threads_start"] >= 2
    assert 0 <= result["receive_queue_bytes_max"] <= 512 << 20  # ingest.zmq.queue_mib
    assert result["warmup_s"] == pytest.approx(MINUTES * 60 / 3)

    # The daemon really received the frames: the store it left holds every one, bit for bit.
    sent = result["frames_sent"]
    assert 0.8 * FPS * MINUTES * 60 <= sent <= FPS * times[-1] + 4  # paced until the last sample
    root = keep / "store"
    ledger = Ledger(root)
    try:
        names = sorted(p.name.removesuffix(".ome.zarr") for p in root.glob("*.ome.zarr"))
        assert names == ["soak-0000"]  # a new acquisition every minute, 18 s: one
        stored = ledger.frames("soak-0000")
        denoised = ledger.denoised_twins("soak-0000")
    finally:
        ledger.close()
    assert stored == list(range(sent)) and result["frames_stored"] == sent
    raw = zarr.open_array(root / "soak-0000.ome.zarr" / "raw" / "0", mode="r")
    pool = camera_frames(SIZE, "uint16", POOL_FRAMES)
    for t in (0, sent // 2, sent - 1):
        np.testing.assert_array_equal(raw[t, 0, 0], pool[t % POOL_FRAMES])
    # Training was on: the model the registry points at (if one was promoted in time on a busy
    # machine) and the twins the ledger holds are what the line says.
    pointer = root / "models" / "current"
    version = int(pointer.read_text()) if pointer.exists() else None
    assert result["model_version"] == version
    assert result["frames_denoised"] == len(denoised)
    assert version is not None or not denoised  # twins only from a model
    assert result["daemon_exit_code"] == 0


def test_rss_trend_is_the_least_squares_line_after_the_warmup():
    points = [(t, 100.0 + 0.5 * t) for t in range(60, 601)]  # 0.5 MB/s from 130 MB at 60 s
    slope, at_warmup, growth = rss_trend(points, 60.0)
    assert slope == pytest.approx(0.5) and at_warmup == pytest.approx(130.0)
    assert growth == pytest.approx(100 * 0.5 * 540 / 130)
    assert rss_trend(points[:1], 60.0) == (None, None, None)


def test_the_steady_state_trend_starts_a_minute_after_the_first_model():
    """Flat at 700 MB, a 200 MB step when inference starts at 300 s, then flat again: the trend
    after the first minute shows the step, the steady-state one does not. Times as sampled (a
    fraction of a second off the whole) come back rounded to 10 ms."""
    rows = [
        {"t_s": t + 0.254, "rss_mb": 700.0 + (200.0 if t >= 300 else 0.0), "open_files": 30.0,
         "threads": 30.0, "backlog_frames": 0.0, "receive_queue_bytes": 0.0,
         "model_version": 1.0 if t >= 300 else 0.0}
        for t in range(601)
    ]  # fmt: skip
    result = summary(rows, warmup_s=60.0)
    assert result["rss_growth_after_warmup_pct"] > 20
    assert (result["first_model_s"], result["steady_from_s"]) == (300.25, 360.25)
    assert result["rss_mb_per_hour_steady"] == pytest.approx(0, abs=1e-6)
    assert result["rss_growth_steady_pct"] == pytest.approx(0, abs=1e-6)
    rows = [row | {"model_version": 0.0} for row in rows]
    assert summary(rows, warmup_s=60.0)["rss_growth_steady_pct"] is None  # no model: no steady


def test_summary_gives_start_end_max_and_skips_missing_metrics():
    rows = [
        {"t_s": 0.0, "rss_mb": 10.0, "open_files": 5.0, "threads": 3.0,
         "backlog_frames": None, "receive_queue_bytes": None},
        {"t_s": 1.0, "rss_mb": 30.0, "open_files": 7.0, "threads": 3.0,
         "backlog_frames": 4.0, "receive_queue_bytes": 100.0},
        {"t_s": 2.0, "rss_mb": 20.0, "open_files": 6.0, "threads": 3.0,
         "backlog_frames": 2.0, "receive_queue_bytes": 0.0},
    ]  # fmt: skip
    result = summary(rows, warmup_s=1.0)
    assert (result["rss_mb_start"], result["rss_mb_end"], result["rss_mb_max"]) == (10, 20, 30)
    assert (result["backlog_frames_start"], result["backlog_frames_max"]) == (4, 4)
    assert result["receive_queue_bytes_end"] == 0
    assert result["rss_mb_per_hour"] == pytest.approx(-10 * 3600)


def test_the_daemon_runs_this_pn2v_live_not_one_in_the_working_directory(tmp_path, monkeypatch):
    shadow = tmp_path / "pn2v_live"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('the working directory\\'s pn2v_live')")
    monkeypatch.chdir(tmp_path)
    log = tmp_path / "serve.log"
    daemon = start_daemon(["nonsense.key=1"], log)  # refused at start, by this pn2v_live
    assert daemon.wait(timeout=120) == 2
    assert "nonsense: unknown key" in log.read_text()
