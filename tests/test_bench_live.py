"""`pn2v-live bench --part live`: the real daemon in its own process, a real replay over ZeroMQ,
and scores that this test recomputes from the store the daemon left behind.

A 64×64 crop of fov03's first 12 frames at 4 frames/s, for one minute, with a tiny training
budget (K = 50, 32² patches, 4 per step); the noise model is fitted to fov01.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.service.bench.pace import Pace
from pn2v_live.service.config import TrainerConfig
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store

CLI = [sys.executable, "-m", "pn2v_live"]
FRAMES = 12
CROP = (slice(200, 264), slice(200, 264))
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(data_dir, tmp_path_factory) -> dict:
    """The stack to replay, its ground truth and a noise model, as files."""
    folder = tmp_path_factory.mktemp("bench-live")
    fmd = data_dir / "fmd_confocal_bpae"
    raw = tifffile.imread(fmd / "fov03" / "raw.tif")[:FRAMES, CROP[0], CROP[1]]
    gt = tifffile.imread(fmd / "fov03" / "gt.tif")[CROP]
    tifffile.imwrite(folder / "stack.tif", raw)
    tifffile.imwrite(folder / "gt.tif", gt)
    fov01 = tifffile.imread(fmd / "fov01" / "raw.tif")
    signal = np.broadcast_to(fov01.mean(0), fov01.shape)
    save_noise_model(PoissonGaussianNoiseModel.fit(signal, fov01), folder / "noise-model.pt")
    files = {name: folder / f"{name}.tif" for name in ("stack", "gt")}
    return {**files, "noise_model": folder / "noise-model.pt", "raw": raw, "truth": gt}


def tiny_training() -> list[str]:
    """--set arguments for a daemon that trains a little, often, on the CPU."""
    settings = {
        "trainer.steps_per_round": 10,
        "trainer.k": 50,
        "trainer.patch_size": 32,
        "trainer.batch_size": 4,
        "trainer.every_seconds": 10,
        "trainer.device": '"cpu"',
        "inference.device": '"cpu"',
        "inference.compile": "false",
    }
    # Where this trainer has a first-model rule: a first model from these few frames after a few
    # steps, promoted whatever its estimated gain (this test checks the bench, not the trainer).
    first_model = {"first_model_frames": 8, "first_model_steps": 20, "min_gain_db": -100}
    for key, value in first_model.items():
        if key in TrainerConfig.model_fields:
            settings[f"trainer.{key}"] = value
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def psnr(image: np.ndarray, truth: np.ndarray) -> float:
    error = np.mean((np.asarray(image, np.float64) - np.asarray(truth, np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / error))


def brightness_fitted(truth: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """`truth` scaled and shifted to `frame`'s brightness by least squares."""
    return np.polyval(np.polyfit(truth.ravel(), frame.ravel().astype(np.float64), 1), truth)


def test_live_replay_scores_what_the_daemon_stored(inputs, tmp_path):
    keep = tmp_path / "kept"
    command = CLI + ["bench", "--part", "live", "--data", str(inputs["stack"]),
                     "--gt", str(inputs["gt"]), "--fps", "4", "--minutes", "1",
                     "--noise-model-file", str(inputs["noise_model"]), "--offline",
                     "--keep", str(keep), *tiny_training()]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=400, env=ENV)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (line,) = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    result = json.loads(line)
    progress = [json.loads(x) for x in completed.stderr.splitlines() if x.startswith("{")]
    twins = [p for p in progress if "frame" in p]

    assert result["part"] == "live" and result["daemon_exit_code"] == 0
    assert (result["frames"], result["frames_stored"], result["fps"]) == (FRAMES, FRAMES, 4.0)
    assert result["minutes"] == 1.0 and result["k"] == 50 and result["dtype"] == "uint8"
    assert result["first_twin_s"] > 0 and twins

    # The store the daemon left: raw frames as sent, twins scored exactly as the bench did.
    store = Store(keep / "store", writer=True)  # the daemon has let go of it
    acquisition = store.acquisition(result["acquisition"])
    raw, gt = inputs["raw"], inputs["truth"].astype(np.float64)
    gains, corrected_gains = {}, {}
    for t in range(FRAMES):
        np.testing.assert_array_equal(acquisition.read_raw(t), raw[t])
        denoised = acquisition.read_denoised(t)
        if denoised is None:
            continue
        corrected = brightness_fitted(gt, raw[t])
        gains[t] = psnr(denoised, gt) - psnr(raw[t], gt)
        corrected_gains[t] = psnr(denoised, corrected) - psnr(raw[t], corrected)
        last = [p for p in twins if p["frame"] == t][-1]  # the latest line on frame t
        assert last["version"] == acquisition.denoised_version(t)
        assert last["window"] == str(acquisition.denoised_window(t))
        assert last["gain_db"] == pytest.approx(gains[t], abs=2e-4)
        assert last["gain_drift_corrected_db"] == pytest.approx(corrected_gains[t], abs=2e-4)
    store.close()
    assert result["frames_denoised"] == len(gains) > 0
    assert result["final_gain_db"] == pytest.approx(np.mean(list(gains.values())), abs=2e-4)
    final = result["final_gains_db"]
    assert len(final) == FRAMES
    for t in range(FRAMES):
        assert final[t] == (pytest.approx(gains[t], abs=2e-4) if t in gains else None)
    assert result["final_gain_drift_corrected_db"] == pytest.approx(
        np.mean(list(corrected_gains.values())), abs=2e-4
    )
    raw_psnr = np.mean([psnr(raw[t], gt) for t in range(FRAMES)])
    assert result["raw_psnr_db"] == pytest.approx(raw_psnr, abs=2e-4)

    # The lowest gain and the first times come from every twin seen, not only the final ones.
    assert result["min_gain_db"] == min(p["gain_db"] for p in twins)
    assert result["min_gain_drift_corrected_db"] == min(p["gain_drift_corrected_db"] for p in twins)
    assert result["min_gain_db"] <= result["final_gain_db"]
    assert result["min_gain_drift_corrected_db"] <= result["final_gain_drift_corrected_db"]
    assert result["first_twin_s"] == min(p["t_s"] for p in twins)
    good = [p["t_s"] for p in twins if p["gain_db"] >= 3.0]
    assert result["first_good_twin_s"] == (min(good) if good else None)

    # Steps behind the final model: the registry's chain of versions.
    registry = ModelRegistry(keep / "store" / "models")
    info = registry.current()
    assert result["model_version"] == info.version
    steps = 0
    while info is not None:
        steps += info.training_steps
        info = registry.info(info.parent) if info.parent is not None else None
    assert result["training_steps"] == steps > 0

    # Pace: rounds as the daemon logged them (the last may complete after the last sample),
    # and the backlog worked off when the last frame to get a twin got its first one.
    logged = len(re.findall(r"round \d+ on \d+ frames", (keep / "serve.log").read_text()))
    assert 1 <= result["training_rounds"] <= logged <= result["training_rounds"] + 1
    assert result["round_times_s"] == sorted(result["round_times_s"])
    assert len(result["round_times_s"]) == result["training_rounds"]
    assert 0 < result["stream_end_s"] < 60
    first_twin = {}
    for twin in twins:
        first_twin.setdefault(twin["frame"], twin["t_s"])
    assert len(first_twin) == FRAMES
    assert result["backlog_worked_off_s"] == max(first_twin.values())
    assert result["backlog_max_frames"] >= 0

    # --offline: the same steps, trained on the same frames in this process.
    assert result["offline_steps"] == result["training_steps"]
    assert np.isfinite(result["offline_gain_db"])
    assert np.isfinite(result["offline_gain_drift_corrected_db"])
    offline = result["offline_gains_db"]
    assert result["offline_gain_db"] == pytest.approx(np.mean(offline), abs=1e-3)
    short = [off - gains.get(t, 0.0) for t, off in enumerate(offline)]
    assert result["offline_shortfall_max_db"] == pytest.approx(max(short), abs=1e-3)
    assert result["frames_within_1db_of_offline"] == sum(gap <= 1.0 for gap in short)
    assert (keep / "serve.log").is_file()


def test_live_part_refuses_missing_options_and_the_keys_it_sets(inputs, tmp_path):
    base = CLI + ["bench", "--part", "live", "--data", str(inputs["stack"]),
                  "--gt", str(inputs["gt"]), "--fps", "1", "--minutes", "1"]  # fmt: skip
    completed = subprocess.run(base, capture_output=True, text=True, timeout=120, env=ENV)
    assert completed.returncode == 2
    assert "--part live needs --noise-model-file FILE" in completed.stderr
    command = base + ["--noise-model-file", str(inputs["noise_model"]),
                      "--set", f'store.root="{tmp_path}"']  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ENV)
    assert completed.returncode == 2
    assert "the live bench sets store.root itself" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    ("count", "fps", "minutes", "sent"),
    [(50, 1.0, 15.0, 50), (50, 1.0, 0.5, 30), (12, 4.0, 1.0, 12), (10, 0.01, 0.1, 1)],
)
def test_a_stream_longer_than_the_run_is_cut_where_the_run_ends(count, fps, minutes, sent):
    from pn2v_live.service.bench.live import frames_within

    # frame n leaves n / fps seconds after the first; only those before the end are sent
    assert frames_within(count, fps, minutes) == sent


def test_pace_counts_rounds_and_the_longest_wait_while_the_stream_runs():
    pace = Pace("http://127.0.0.1:1/metrics")  # nothing listens there: a miss, no sample
    pace.take(0.5)
    pace.samples += [(1.0, 0, 0), (2.0, 1, 3), (5.0, 3, 9), (9.0, 3, 0), (12.0, 4, 0)]
    summary = pace.summary(stream_end_s=10.0, denoised_all_s=11.0)
    assert summary["round_times_s"] == [2.0, 5.0, 5.0, 12.0]
    assert summary["training_rounds"] == 4
    assert summary["longest_round_wait_s"] == 6.0  # from 5 s to the backlog's end at 11 s
    assert summary["backlog_max_frames"] == 9 and summary["metrics_misses"] == 1
    assert Pace("x").summary(None, None)["longest_round_wait_s"] is None
