"""`pn2v-live bench` runs the fused and naive formulations side by side and reports JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from pn2v_live.service.bench.quality import load_field


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


def test_quality_part_scores_every_model_against_the_ground_truth(data_dir):
    command = [sys.executable, "-m", "pn2v_live", "bench", "--part", "quality", "--steps", "2",
               "--k", "16", "--threads", "2", "--data", str(data_dir)]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    result = json.loads(line)
    assert result["part"] == "quality" and result["steps_per_model"] == 2
    scores = result["psnr_db"]
    assert set(scores) == {"raw", "n2v", "pn2v[histogram]", "pn2v[hybrid]", "supervised"}
    # raw PSNR of fov03's first 5 frames, computed here independently
    raw, truth = load_field(data_dir, "fov03")
    errors = ((raw[:5].astype(np.float64) - truth) ** 2).mean(axis=(1, 2))
    assert scores["raw"] == pytest.approx(np.mean(10 * np.log10(255**2 / errors)), abs=1e-6)
    assert all(np.isfinite(value) for value in scores.values())
    # two steps train nothing useful; the per-model progress lines say how long each ran
    progress = [json.loads(x) for x in completed.stderr.splitlines() if x.startswith('{"run"')]
    assert [p["run"] for p in progress] == list(scores)[1:] and {p["steps"] for p in progress} == {
        2
    }


def test_quality_part_refuses_a_folder_without_the_data(tmp_path):
    command = [
        sys.executable,
        "-m",
        "pn2v_live",
        "bench",
        "--part",
        "quality",
        "--data",
        str(tmp_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "fmd_confocal_bpae" in completed.stderr and "Traceback" not in completed.stderr
