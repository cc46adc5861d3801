"""`pn2v-live bench` runs the fused and naive formulations side by side and reports JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_bench_reports_fused_and_naive_side_by_side():
    command = [sys.executable, "-m", "pn2v_live", "bench", "--part", "predict", "--part", "train",
               "--part", "pipeline", "--frames", "4", "--size", "32", "--k", "16",
               "--repeats", "1", "--baseline", "naive", "--threads", "1"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    predict, train, pipeline = (json.loads(line) for line in lines)
    assert predict["part"] == "predict" and predict["device"] == "cpu"
    assert predict["max_relative_difference"] < 1e-5
    assert predict["speedup"] == round(predict["baseline"]["median_s"] / predict["median_s"], 2)
    assert predict["peak_rss_mb"] > 50 and predict["torch_threads"] == 1
    assert train["part"] == "train"
    assert train["loss_relative_difference"] < 1e-5
    assert train["patches_per_s"] > 0 and train["baseline"]["median_s"] > 0
    assert pipeline["part"] == "pipeline" and pipeline["frames"] == 4
    # both are rounded from the same unrounded duration: equal to within the rounding
    assert pipeline["frames_per_s"] == pytest.approx(
        4 / pipeline["seconds"], abs=0.01 + 4e-3 / pipeline["seconds"] ** 2
    )
