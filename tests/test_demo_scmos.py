"""`pn2v-live demo --camera scmos`: the simulated sCMOS camera's calibration and recording (the
whole demo, minutes on a CPU, is run by hand: docs/demo.md)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from pn2v_live.core.noise import CameraNoiseModel
from pn2v_live.service.commands.demo import drifting_sample
from pn2v_live.service.commands.demo_scmos import calibrate_scmos, fixed_pattern, scmos_camera
from pn2v_live.storage.camera_maps_file import load_camera_maps
from pn2v_live.storage.noise_model_file import load_noise_model


def test_calibration_recovers_the_cameras_maps_into_the_noise_model(tmp_path, capsys):
    camera = scmos_camera(48, seed=3)
    maps_path = calibrate_scmos(tmp_path / "noise.pt", camera)
    model = load_noise_model(tmp_path / "noise.pt")
    assert isinstance(model, CameraNoiseModel)
    maps = load_camera_maps(maps_path)
    np.testing.assert_array_equal(maps.offset, model.maps.offset)
    truth = camera.maps
    assert np.median(np.abs(maps.offset - truth.offset)) < 0.5
    assert np.median(np.abs(maps.gain / truth.gain - 1)) < 0.05
    assert np.median(np.abs(maps.variance / truth.variance - 1)) < 0.1
    assert np.array_equal(maps.hot_pixels() & truth.hot_pixels(), truth.hot_pixels())
    assert f"of the camera's {int(truth.hot_pixels().sum())}" in capsys.readouterr().out


def test_recording_carries_the_cameras_fixed_pattern_and_its_offsets():
    camera = scmos_camera(48, seed=3)
    recording = drifting_sample(40, 48, scmos=camera)
    assert recording.frames.dtype == np.uint16 and recording.frames.shape == (40, 48, 48)
    np.testing.assert_array_equal(recording.offset_map, camera.maps.offset)
    offset, gain = camera.maps.reference
    pattern = (recording.frames - recording.clean).mean(axis=0)  # clean: reference ADU
    r = np.corrcoef(pattern.ravel(), camera.maps.offset.ravel())[0, 1]
    assert r > 0.8
    words = fixed_pattern(recording.clean[0], recording.frames[0], camera.maps.offset)
    clean_r = np.corrcoef(recording.clean[0].ravel(), camera.maps.offset.ravel())[0, 1]
    assert words.endswith(f"denoised {clean_r:.2f}")


def test_scmos_demo_refuses_data_of_another_camera(tmp_path):
    command = [sys.executable, "-c", "from pn2v_live.service.cli import main; main()", "demo"]
    command += ["--camera", "scmos", "--data", str(tmp_path / "stack.tif")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--camera scmos simulates its own camera" in result.stderr
    assert "Traceback" not in result.stderr
