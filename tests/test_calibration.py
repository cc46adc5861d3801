"""`pn2v-live calibrate`: recovery of known camera parameters, refusal of bad acquisitions (with
nothing written), the report, store inputs, bootstrap mode, and agreement on real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from pn2v_live.calibration.workflow import (
    Acquisition,
    bootstrap_signal,
    calibrate,
    read_acquisition,
    write_outputs,
)
from pn2v_live.core.calibration import brightness_drift, split
from pn2v_live.core.noise import HybridNoiseModel
from pn2v_live.core.synthetic import Camera, acquisition
from pn2v_live.errors import UserError
from pn2v_live.service.cli import app
from pn2v_live.storage.noise_model_file import load_noise_model
from pn2v_live.storage.store import Store

CLI = Path(sys.executable).with_name("pn2v-live")
CAMERA = Camera(gain=2.0, offset=100.0, read_noise=3.0, dtype="uint16")


@pytest.fixture(scope="module")
def pattern() -> np.ndarray:
    """40 frames (T, 128, 128) of a static test pattern on a dark background (signal = offset)."""
    frames, _ = acquisition(CAMERA, 40, (128, 128), background=CAMERA.offset, seed=1)
    return frames


def write_stack(path: Path, frames: np.ndarray) -> Path:
    tifffile.imwrite(path, frames)
    return path


def test_poisson_gaussian_fit_recovers_known_gain_and_read_noise(pattern):
    result = calibrate([Acquisition("pattern", pattern)], kind="poisson-gaussian")
    summary = result.summary
    assert summary["gain"] == pytest.approx(CAMERA.gain, rel=0.05)
    assert summary["read_noise"] == pytest.approx(CAMERA.read_noise, rel=0.05)
    assert summary["offset"] == pytest.approx(CAMERA.offset, abs=0.5)


def test_known_offset_recovers_read_noise_without_a_dark_background():
    frames, _ = acquisition(CAMERA, 40, (128, 128), seed=2)  # background 20 ADU above offset
    result = calibrate([Acquisition("bright", frames)], kind="poisson-gaussian", offset=100.0)
    assert result.summary["gain"] == pytest.approx(CAMERA.gain, rel=0.05)
    assert result.summary["read_noise"] == pytest.approx(CAMERA.read_noise, rel=0.05)


def test_cli_writes_model_report_and_one_json_line(pattern, tmp_path, artifacts_dir):
    stack = write_stack(tmp_path / "pattern.ome.tif", pattern)
    output, report = tmp_path / "camera.pt", artifacts_dir / "calibration-report.png"
    report.unlink(missing_ok=True)
    args = [str(stack), "-o", str(output), "--kind", "all", "--report", str(report)]
    done = subprocess.run(
        [CLI, "calibrate", *args, "--camera", "sim-cam"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    nll = summary["held_out_nll"]
    assert set(nll) == {"hybrid", "histogram", "gmm", "poisson-gaussian"}
    assert summary["chosen"] == min(nll, key=nll.get)
    model = load_noise_model(output)
    assert model.kind == summary["chosen"]
    assert model.metadata["camera"] == "sim-cam" and model.metadata["bootstrapped"] is False
    assert model.metadata["frames"] == 32 and model.metadata["held_out_frames"] == 8
    assert model.metadata["held_out_nll"] == nll
    assert len(model.metadata["row_support"]) == 256
    for kind, path in summary["files"].items():
        assert load_noise_model(path).kind == kind
    # The data really are Poisson–Gaussian: the PG model must be within 2 % of the best.
    assert nll["poisson-gaussian"] < 1.02 * min(nll.values())
    with Image.open(report) as image:
        assert image.format == "PNG" and image.size[0] >= 800
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 20  # a drawn figure, not a blank canvas


def fading(frames: int, fade: float, rng: np.random.Generator | None) -> np.ndarray:
    """The pattern's clean scene fading linearly by `fade` (a fraction of the signal above the
    camera offset) from the first to the last of `frames`; noise-free when `rng` is None."""
    _, clean = acquisition(CAMERA, 1, (128, 128), background=CAMERA.offset, seed=1)
    series = []
    for t in range(frames):
        signal = CAMERA.offset + (clean - CAMERA.offset) * (1 - fade * t / (frames - 1))
        series.append(signal if rng is None else CAMERA.expose(signal, rng))
    return np.stack(series)


def test_brightness_drift_of_a_linear_fade_is_the_fade_against_the_mean():
    # gain_t = (1 - 0.15 t / 39) / (1 - 0.15 / 2) against the mean: the change is 0.15 / 0.925
    drift, error = brightness_drift(fading(40, 0.15, rng=None))
    assert drift == pytest.approx(0.15 / 0.925, rel=1e-6)
    assert error < 1e-6


def test_bleaching_series_is_calibrated_with_a_warning_naming_the_change(pattern):
    bleaching = fading(40, 0.15, np.random.default_rng(3))
    warned = calibrate([Acquisition("bleaching", bleaching)], kind="poisson-gaussian").warnings
    assert any("bleaching: the brightness changes by 16." in w for w in warned), warned
    static = calibrate([Acquisition("static", pattern)], kind="poisson-gaussian").warnings
    assert not any("brightness" in w for w in static), static


def test_one_frame_input_exits_2_with_a_message_and_writes_nothing(pattern, tmp_path):
    stack = write_stack(tmp_path / "single.tif", pattern[:1])
    output, report = tmp_path / "model.pt", tmp_path / "report.png"
    done = subprocess.run(
        [CLI, "calibrate", stack, "-o", output, "--report", report], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: single.tif: 1 frame(s)")
    assert "Traceback" not in done.stderr
    assert not output.exists() and not report.exists() and done.stdout == ""


def refused(tmp_path: Path, *args: str) -> str:
    """Run calibrate in-process; assert it refused with UserError and wrote nothing."""
    output, report = tmp_path / "model.pt", tmp_path / "report.png"
    result = CliRunner().invoke(
        app, ["calibrate", *args, "-o", str(output), "--report", str(report)]
    )
    assert isinstance(result.exception, UserError), result.output
    assert not output.exists() and not report.exists()
    return str(result.exception)


def test_moving_scene_is_refused(pattern, tmp_path):
    moving = np.stack([np.roll(f, shift=i // 4, axis=1) for i, f in enumerate(pattern)])
    message = refused(tmp_path, str(write_stack(tmp_path / "moving.tif", moving)))
    assert "not static" in message and "px" in message


def test_saturated_stack_is_refused(pattern, tmp_path):
    saturated = np.clip(pattern.astype(np.int64) * 200, 0, 65535).astype(np.uint16)
    message = refused(tmp_path, str(write_stack(tmp_path / "saturated.tif", saturated)))
    assert "camera's maximum (65535)" in message and "exposure" in message


def test_mixed_dtypes_and_too_few_pairs_are_refused(pattern, tmp_path):
    first = write_stack(tmp_path / "a.tif", pattern)
    second = write_stack(tmp_path / "b.tif", (pattern // 4).astype(np.uint8))
    assert "mix camera data types" in refused(tmp_path, str(first), str(second))
    small = write_stack(tmp_path / "small.tif", pattern[:10, :16, :16])
    assert "too few for 256 signal bins" in refused(tmp_path, str(small))


def test_flat_field_is_refused_as_too_narrow(tmp_path):
    rng = np.random.default_rng(3)
    flat = np.stack([CAMERA.expose(np.full((64, 64), 300.0), rng) for _ in range(20)])
    message = refused(tmp_path, str(write_stack(tmp_path / "flat.tif", flat)), "--bins", "64")
    assert "spans only" in message and "dark and bright" in message


def test_acquisition_from_the_store_is_read_frame_for_frame(pattern, tmp_path):
    store = Store(tmp_path / "data")
    written = store.create("calib", pattern.shape[1:], pattern.dtype)
    for t, frame in enumerate(pattern):
        written.write_raw(t, frame)
    store.close()
    read = read_acquisition(tmp_path / "data" / "calib.ome.zarr")
    assert read.name == "calib"
    np.testing.assert_array_equal(read.frames, pattern)


def test_per_frame_signals_recover_the_camera_and_mark_the_model_bootstrapped(tmp_path):
    """Bootstrap mode fits per-frame signal estimates; with exact ones it must find the camera."""
    frames, clean = acquisition(CAMERA, 12, (128, 128), background=CAMERA.offset, seed=4)
    acquisitions = [Acquisition("noisy", frames)]
    signals = [np.broadcast_to(clean, frames.shape)]
    result = calibrate(acquisitions, kind="gmm", bootstrap_signals=signals)
    assert result.summary["bootstrapped"] is True
    assert result.summary["gain"] == pytest.approx(CAMERA.gain, rel=0.05)
    paths = write_outputs(result, tmp_path / "boot.pt", tmp_path / "boot.png", everything=False)
    assert load_noise_model(paths["output"]).metadata["bootstrapped"] is True
    with Image.open(tmp_path / "boot.png") as image:
        assert image.format == "PNG"


def test_bootstrap_signal_is_an_n2v_prediction_per_frame():
    """Two tiny N2V steps (the real network, small patches): one finite estimate per frame,
    smoother than the noisy frame it came from."""
    frames, _ = acquisition(CAMERA, 2, (64, 64), background=CAMERA.offset, seed=5)
    (signal,) = bootstrap_signal(
        [Acquisition("noisy", frames)], steps=2, minutes=None, batch_size=2, patch_size=32
    )
    assert signal.shape == frames.shape and np.isfinite(signal).all()
    assert np.diff(signal, axis=2).std() < np.diff(frames.astype(float), axis=2).std()


def test_fov01_and_fov02_calibrations_agree(data_dir):
    """Issue acceptance: gain within 10 %, read noise within 20 %, and each model's held-out
    NLL on the other field of view within 2 % of that field's own model."""
    folder = data_dir / "fmd_confocal_bpae"
    fovs = {}
    for name in ("fov01", "fov02"):  # every second pixel in y and x: 4× faster, same statistics
        frames = read_acquisition(folder / name / "raw.tif").frames[:, ::2, ::2]
        fovs[name] = Acquisition(name, np.ascontiguousarray(frames))
    results = {name: calibrate([a], kind="hybrid") for name, a in fovs.items()}
    one, two = (results[name].poisson_gaussian for name in fovs)
    assert one.gain == pytest.approx(two.gain, rel=0.10)
    assert one.read_noise == pytest.approx(two.read_noise, rel=0.20)
    for data_name, own in results.items():
        data = fovs[data_name]
        signal, held = data.frames.mean(0), split(data.frames)[1]
        for model_name, other in results.items():
            assert isinstance(other.models["hybrid"], HybridNoiseModel)
            cross = other.models["hybrid"].nll(signal, held)
            assert cross == pytest.approx(own.summary["held_out_nll"]["hybrid"], rel=0.02), (
                data_name,
                model_name,
            )
