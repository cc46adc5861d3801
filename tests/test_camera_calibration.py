"""Calibrating sCMOS maps from synthetic dark and flat series with known maps (acceptance 1),
and the checks that refuse series that would give wrong maps."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from pn2v_live.calibration.camera_maps import calibrate_camera, fit_check, maps_from_arrays
from pn2v_live.calibration.workflow import Acquisition
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.errors import UserError
from pn2v_live.storage.camera_maps_file import load_camera_maps
from pn2v_live.storage.noise_model_file import load_noise_model

FRAMES = 200
LEVELS = (100.0, 400.0, 1000.0, 2000.0)  # photo-electrons


@pytest.fixture(scope="module")
def truth():
    return scmos_maps((64, 64), seed=21)


@pytest.fixture(scope="module")
def series(truth):
    camera = ScmosCamera(truth)
    dark = Acquisition("dark", camera.series(0.0, FRAMES, seed=1))
    flats = [Acquisition(f"flat{e:.0f}", camera.series(e, FRAMES, seed=2 + i))
             for i, e in enumerate(LEVELS)]  # fmt: skip
    return dark, flats


@pytest.fixture(scope="module")
def calibration(series):
    return calibrate_camera(*series, camera="synthetic")


def test_maps_are_recovered_within_the_acceptance_bounds(truth, calibration):
    maps = calibration.maps
    offset_error = np.median(np.abs(maps.offset - truth.offset))
    gain_error = np.median(np.abs(maps.gain / truth.gain - 1))
    # The dark's variance also holds the 1/12 ADU² of rounding to whole ADU.
    variance_error = np.median(np.abs(maps.variance / (truth.variance + 1 / 12) - 1))
    print(f"offset {offset_error:.3f} ADU, gain {gain_error:.2%}, variance {variance_error:.2%}")
    assert offset_error < 0.5 and gain_error < 0.05 and variance_error < 0.10
    assert calibration.summary["levels_electrons"] == pytest.approx(LEVELS, rel=0.05)


def test_hot_pixels_are_flagged(truth, calibration):
    found, true = calibration.maps.hot_pixels(), truth.hot_pixels()
    assert calibration.summary["hot_pixels"] == int(found.sum())
    assert (found & true).sum() >= 0.95 * true.sum() and (found & ~true).sum() <= 2


def test_too_few_frames_a_single_level_and_saturation_are_refused(series, truth):
    dark, flats = series
    with pytest.raises(UserError, match="at least 20 frames"):
        calibrate_camera(Acquisition("short", dark.frames[:10]), flats)
    with pytest.raises(UserError, match="at least 2 light levels"):
        calibrate_camera(dark, flats[:1])
    with pytest.raises(UserError, match="about one light level"):
        calibrate_camera(dark, [flats[1], Acquisition("again", flats[1].frames[::-1])])
    saturated = ScmosCamera(truth, dtype="uint8").series(200.0, 30, seed=5)
    with pytest.raises(UserError, match="clipped at the camera's maximum"):
        calibrate_camera(dark, [flats[0], Acquisition("bright", saturated)])


def test_light_leak_in_the_dark_and_a_flickering_flat_are_refused(series, truth):
    dark, flats = series
    camera = ScmosCamera(truth)
    gradient = np.linspace(0, 15, 64)[None, :] * np.ones((64, 1))  # stray light, electrons
    rng = np.random.default_rng(6)
    leaky = np.stack([camera.expose_electrons(gradient, rng) for _ in range(60)])
    with pytest.raises(UserError, match="light reaches the sensor"):
        calibrate_camera(Acquisition("leaky", leaky), flats)
    flicker = np.stack([camera.expose_electrons(400 * rng.uniform(0.97, 1.03), rng)
                        for _ in range(60)])  # fmt: skip
    with pytest.raises(UserError, match="vary .* more than"):
        calibrate_camera(dark, [flats[0], Acquisition("flicker", flicker)])


def test_user_maps_fit_check_names_a_too_high_offset_and_a_relative_gain(truth, series):
    warnings: list[str] = []
    gain = truth.gain / 4
    gain[3, 3] = 0.0
    maps = maps_from_arrays(truth.offset + 12, gain, truth.variance, warnings)
    assert maps.gain[3, 3] == pytest.approx(np.median(gain[gain > 0]))
    assert "1 pixel(s) ≤ 0" in warnings[0]
    check = fit_check(maps, series[0].frames, "dark", fitted_gain=float(np.median(truth.gain)))
    assert check["share_below_offset"] > 0.5
    assert len(maps.metadata["fit_check"]["warnings"]) == 2
    good = fit_check(truth, series[0].frames, "dark", fitted_gain=float(np.median(truth.gain)))
    assert good["share_below_offset"] < 0.005


def test_cli_calibrates_maps_and_stores_them_with_the_noise_model(series, tmp_path):
    dark, flats = series
    paths = []
    for acquisition in [dark, *flats[:3]]:
        path = tmp_path / f"{acquisition.name}.tif"
        tifffile.imwrite(path, acquisition.frames[:60], photometric="minisblack")
        paths.append(str(path))
    command = [sys.executable, "-m", "pn2v_live", "calibrate", "-o", str(tmp_path / "noise.pt"),
               "--dark", paths[0], "--flat", paths[1], "--flat", paths[2], "--flat", paths[3],
               "--report", str(tmp_path / "report.png")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["kind"] == "camera-maps" and summary["maps"]["hot_pixels"] > 0
    maps = load_camera_maps(tmp_path / "noise.camera.tif")
    model = load_noise_model(tmp_path / "noise.pt")
    np.testing.assert_array_equal(model.maps.variance, maps.variance)
    assert (tmp_path / "report.camera.png").stat().st_size > 10_000
    assert "fewer than 100 frames" in done.stderr  # 60 frames: usable, with a warning


def run_calibrate_with_map_files(tmp_path, name, offset, truth, raw):
    """`calibrate` with the maps as separate TIFFs (offset shifted by the caller) and `raw` as
    INPUT; (JSON summary, stderr)."""
    folder = tmp_path / name
    folder.mkdir()
    paths = {}
    for what, values in {"offset": offset, "gain": truth.gain, "variance": truth.variance,
                         "raw": raw}.items():  # fmt: skip
        paths[what] = folder / f"{what}.tif"
        tifffile.imwrite(paths[what], values, photometric="minisblack")
    command = [sys.executable, "-m", "pn2v_live", "calibrate", "-o", str(folder / "noise.pt"),
               "--offset-map", str(paths["offset"]), "--gain-map", str(paths["gain"]),
               "--variance-map", str(paths["variance"]), str(paths["raw"])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_cli_with_map_files_checks_them_against_the_data_and_warns_on_a_misfit(truth, tmp_path):
    raw, _ = ScmosCamera(truth).acquisition(20, seed=8)
    summary, stderr = run_calibrate_with_map_files(tmp_path, "right", truth.offset, truth, raw)
    check = summary["fit_check"]["raw.tif"]
    assert check["share_below_offset"] < check["read_noise_allows"] < 0.002
    assert check["photon_transfer_gain"] == pytest.approx(np.median(truth.gain), rel=0.1)
    assert "do not fit" not in stderr and "WARNING pn2v_live.calibration.camera_maps" not in stderr
    # 4 σ of read noise too high: ~10 % of the background's values fall 3 σ below the map.
    summary, stderr = run_calibrate_with_map_files(tmp_path, "high", truth.offset + 12, truth, raw)
    check = summary["fit_check"]["raw.tif"]
    assert check["share_below_offset"] > 0.05
    warning = next(line for line in stderr.splitlines() if "do not fit" in line)
    assert "WARNING" in warning and f"{check['share_below_offset']:.2%}" in warning
    assert "at most 0.13%" in warning and "offset map is too high" in warning
    assert any("do not fit" in message for message in summary["warnings"])
    saved = load_camera_maps(tmp_path / "high" / "noise.camera.tif")
    assert saved.metadata["fit_check"]["raw.tif"]["share_below_offset"] > 0.05
