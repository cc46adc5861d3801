"""`pn2v-live bench` runs the fused and naive formulations side by side and reports JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pn2v_live.service.bench.quality import drift_corrected, load_field


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
    assert (predict["dtype"], pipeline["dtype"]) == ("float32", "uint16")  # frames it handles
    # both are rounded from the same unrounded duration: equal to within the rounding
    assert pipeline["frames_per_s"] == pytest.approx(
        4 / pipeline["seconds"], abs=0.01 + 4e-3 / pipeline["seconds"] ** 2
    )


def test_quality_part_scores_every_model_against_the_ground_truth(data_dir):
    command = [sys.executable, "-m", "pn2v_live", "bench", "--part", "quality", "--steps", "1",
               "--seeds", "2", "--k", "16", "--threads", "2", "--data", str(data_dir),
               "--noise-model", "histogram", "--noise-model", "gmm",
               "--score-frames", "2"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    result = json.loads(line)
    assert result["part"] == "quality" and result["steps_per_model"] == 1
    assert result["seeds"] == 2 and result["scored_frames"] == [0, 1]
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert result["body_dtype"] == ("bfloat16" if native else "float32")
    scores, corrected = result["psnr_db"], result["psnr_drift_corrected_db"]
    assert set(scores) == {"raw", "n2v", "pn2v[histogram,0:0]", "pn2v[gmm,0:0]", "supervised"}
    assert set(corrected) == set(scores)
    # raw PSNR of fov03's first 2 frames, computed here independently: against the ground
    # truth, and against the ground truth fitted (gain, offset) to each frame's brightness
    raw, truth = load_field(data_dir, "fov03")
    raw = raw[:2].astype(np.float64)
    errors = ((raw - truth) ** 2).mean(axis=(1, 2))
    assert scores["raw"] == pytest.approx(np.mean(10 * np.log10(255**2 / errors)), abs=1e-6)
    fits = [np.polyval(np.polyfit(truth.ravel(), frame.ravel(), 1), truth) for frame in raw]
    errors = ((raw - np.stack(fits)) ** 2).mean(axis=(1, 2))
    assert corrected["raw"] == pytest.approx(np.mean(10 * np.log10(255**2 / errors)), abs=1e-4)
    # fov03 bleaches: its first frames are brighter than the 50-frame average
    assert corrected["raw"] > scores["raw"]
    assert all(np.isfinite(value) for value in [*scores.values(), *corrected.values()])
    # every score is the mean of the two seeds' runs, each reported under *_by_seed
    for name in scores:
        for score in ("psnr_db", "psnr_drift_corrected_db"):
            by_seed = result[f"{score}_by_seed"][name]
            assert len(by_seed) == 2 and result[score][name] == pytest.approx(np.mean(by_seed))
    assert result["psnr_db_by_seed"]["raw"] == [scores["raw"]] * 2
    # one step trains nothing useful; the per-model progress lines say how long each ran
    progress = [json.loads(x) for x in completed.stderr.splitlines() if x.startswith('{"run"')]
    assert [(p["run"], p["seed"]) for p in progress] == [(n, s) for s in (0, 1) for n in scores]
    assert [p.get("steps") for p in progress] == [None, 1, 1, 1, 1] * 2
    assert [p["psnr"] for p in progress if p["seed"] == 1] == [
        result["psnr_db_by_seed"][name][1] for name in scores
    ]


def test_quality_part_scores_temporal_context_on_a_drifting_field(data_dir):
    command = [sys.executable, "-m", "pn2v_live", "bench", "--part", "quality", "--steps", "1",
               "--k", "16", "--threads", "2", "--data", str(data_dir), "--noise-model",
               "histogram", "--context", "1:1", "--drift", "3", "--target", "fov04",
               "--score-frames", "2", "--score-spread"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    result = json.loads(line)
    assert (result["target"], result["drift_px_per_frame"]) == ("fov04", 3)
    assert result["minutes_per_model"] is None  # --steps alone: no wall-clock limit
    assert result["scored_frames"] == [0, 25]  # two frames spread over the 50
    scores = result["psnr_db"]
    # the temporal model is scored on its refined and on its live (causal) twins
    assert set(scores) == {
        "raw", "n2v", "pn2v[histogram,1:1]", "pn2v[histogram,1:1] live", "supervised"
    }  # fmt: skip
    # raw PSNR of the drifting crops, computed here: frame t shows columns 3t … 3t + 512 − 147
    raw, truth = load_field(data_dir, "fov04")
    width = 512 - 49 * 3
    errors = [((raw[t, :, 3 * t : 3 * t + width].astype(np.float64)
                - truth[:, 3 * t : 3 * t + width]) ** 2).mean() for t in (0, 25)]  # fmt: skip
    assert scores["raw"] == pytest.approx(np.mean(10 * np.log10(255**2 / np.array(errors))))
    progress = [json.loads(x) for x in completed.stderr.splitlines() if x.startswith('{"run"')]
    assert {p["context"] for p in progress if p["run"].startswith("pn2v")} == {"1:1"}
    assert all(p["drift"] == 3 for p in progress)


def test_drift_correction_recovers_a_frame_s_gain_and_offset():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 200, (64, 64)).astype(np.float32)
    frame = 1.07 * truth - 0.3 + rng.normal(0, 5, truth.shape)
    reference = drift_corrected(frame, truth)
    # closed form: the reference is 1.07·truth − 0.3 up to the fit's error (5/√4096 per pixel)
    np.testing.assert_allclose(reference, 1.07 * truth - 0.3, atol=0.5)
    assert reference.dtype == np.float32 and reference.shape == truth.shape


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


def test_quality_part_refuses_an_unknown_noise_model_kind(data_dir):
    command = [sys.executable, "-m", "pn2v_live", "bench", "--part", "quality", "--data",
               str(data_dir), "--noise-model", "histogram", "--noise-model", "gauss"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "--noise-model must be one of" in completed.stderr and "'gauss'" in completed.stderr
    assert "Traceback" not in completed.stderr
