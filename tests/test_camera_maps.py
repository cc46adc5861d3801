"""sCMOS camera maps: the maps object and file, the synthetic camera, the per-pixel likelihood."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pn2v_live.core.camera import CameraMaps
from pn2v_live.core.noise import CameraNoiseModel, HistogramNoiseModel, noise_model_from_state
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.errors import UserError
from pn2v_live.storage.camera_maps_file import load_camera_maps, save_camera_maps
from pn2v_live.storage.noise_model_file import load_noise_model, save_noise_model


@pytest.fixture(scope="module")
def maps() -> CameraMaps:
    return scmos_maps((64, 64), seed=1)


def test_synthetic_maps_have_the_asked_hot_pixels_and_spreads(maps):
    hot = maps.hot_pixels()
    assert 0.002 < hot.mean() < 0.01  # 0.5 % asked, 4096 pixels
    assert np.median(maps.variance[hot]) > 8 * np.median(maps.variance[~hot])
    assert maps.reference[0] == pytest.approx(100, abs=0.5)
    assert maps.reference[1] == pytest.approx(2.0, rel=0.02)
    assert 2.0 < maps.offset.std() < 4.0


def test_synthetic_camera_reads_the_maps_in_dark_and_flat_frames(maps):
    camera = ScmosCamera(maps)
    dark = camera.series(0.0, 400, seed=2).astype(np.float64)
    assert np.median(np.abs(dark.mean(0) - maps.offset)) < 0.2
    # Var of a mean of 400 frames is variance/400; rounding adds 1/12 ADU².
    variance_ratio = dark.var(0, ddof=1) / (maps.variance + 1 / 12)
    assert np.median(variance_ratio) == pytest.approx(1.0, abs=0.03)
    flat = camera.series(500.0, 200, seed=3).astype(np.float64)
    expected_mean = maps.offset + maps.gain * 500
    assert np.median(np.abs(flat.mean(0) - expected_mean) / expected_mean) < 0.005
    expected_variance = maps.gain**2 * 500 + maps.variance
    assert np.median(flat.var(0, ddof=1) / expected_variance) == pytest.approx(1.0, abs=0.03)


def test_equalised_frames_have_the_reference_mean_and_the_pixel_variance(maps):
    camera = ScmosCamera(maps)
    electrons = 50.0
    equalised = maps.equalise(camera.series(electrons, 300, seed=4)).astype(np.float64)
    offset, gain = maps.reference
    error = equalised.mean(0) - (offset + gain * electrons)
    # Mean of 300 frames: std √((g²·50 + w) / 300) ≈ 0.84 ADU, median |error| ≈ 0.56 ADU.
    assert abs(error.mean()) < 0.05 and np.median(np.abs(error)) < 0.65
    expected = gain * gain * electrons + maps.pixel_variance()
    assert np.median(equalised.var(0, ddof=1) / expected) == pytest.approx(1.0, abs=0.05)


def test_region_cuts_the_maps_at_the_sensor_position_and_refuses_frames_beyond(maps):
    placed = CameraMaps(maps.offset, maps.gain, maps.variance, origin=(100, 200))
    crop = placed.region((110, 230), (16, 20))
    assert crop.origin == (110, 230)
    np.testing.assert_array_equal(crop.offset, maps.offset[10:26, 30:50])
    assert crop.reference == placed.reference  # a crop equalises like the whole sensor
    raw = np.full((16, 20), 150.0)
    whole = placed.equalise(np.full((64, 64), 150.0))
    np.testing.assert_allclose(crop.equalise(raw), whole[10:26, 30:50], rtol=1e-6)
    with pytest.raises(ValueError, match="outside the camera maps.*rows 100–163"):
        placed.region((90, 200), (16, 16))
    with pytest.raises(ValueError, match="outside the camera maps"):
        placed.region((100, 200), (65, 64))


def test_maps_refuse_zero_gain_and_mismatched_shapes(maps):
    gain = maps.gain.copy()
    gain[3, 4] = 0
    with pytest.raises(ValueError, match="1 pixel"):
        CameraMaps(maps.offset, gain, maps.variance)
    with pytest.raises(ValueError, match="one shape"):
        CameraMaps(maps.offset, maps.gain[:10], maps.variance)


def test_maps_file_round_trip_and_refusals(maps, tmp_path):
    placed = CameraMaps(maps.offset, maps.gain, maps.variance, (5, 7), metadata={"frames": 123})
    path = save_camera_maps(placed, tmp_path / "camera.tif")
    loaded = load_camera_maps(path)
    np.testing.assert_array_equal(loaded.gain, maps.gain)
    np.testing.assert_array_equal(loaded.variance, maps.variance)
    assert loaded.origin == (5, 7) and loaded.metadata["frames"] == 123
    assert loaded.reference == pytest.approx(maps.reference)
    with pytest.raises(UserError, match="no such camera-maps file"):
        load_camera_maps(tmp_path / "missing.tif")
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", maps.offset)
    with pytest.raises(UserError, match="not a pn2v-live camera-maps file"):
        load_camera_maps(tmp_path / "plain.tif")


def test_pixel_likelihood_of_the_maps_model_is_the_per_pixel_gaussian(maps):
    model = CameraNoiseModel.from_maps(maps, (100.0, 1000.0))
    offset, gain = maps.reference
    w = torch.from_numpy(maps.pixel_variance()[:4, :4].reshape(-1, 1))
    signal = torch.tensor([[90.0, 100.0, 140.0, 600.0]])
    observation = torch.tensor([[95.0], [101.0], [150.0], [580.0]]).repeat_interleave(4, 0)
    variance = gain * (signal - offset).clamp(min=0) + w
    expected = -0.5 * ((observation - signal) ** 2 / variance + torch.log(2 * math.pi * variance))
    got = model.pixel_log_likelihood(observation, signal, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Without a pixel's variance: the typical pixel (the base model).
    torch.testing.assert_close(
        model.pixel_log_likelihood(observation, signal),
        model.base.log_likelihood(observation, signal),
    )


def test_maps_without_read_noise_leave_the_base_model_as_it_is_at_every_signal(maps):
    """Map files without a variance map give every pixel read noise 0 (w_i = w̄ = 0): the
    likelihood is the base model's, also at and below the offset (once NaN: 0 / 0)."""
    silent = CameraMaps(maps.offset, maps.gain, np.zeros(maps.shape), reference=maps.reference)
    offset, gain = maps.reference
    model = CameraNoiseModel(CameraNoiseModel.from_maps(maps, (100.0, 1000.0)).base, silent)
    signal = torch.tensor([[offset - 20.0, offset, offset + 0.5, offset + 300.0]])
    observation = torch.tensor([[offset - 15.0], [offset + 2.0], [offset + 40.0]])
    w = torch.zeros_like(observation)
    got = model.pixel_log_likelihood(observation, signal, w)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, model.base.log_likelihood(observation, signal))


def test_rescaled_base_integrates_to_one_and_keeps_its_gradient():
    maps = scmos_maps((8, 8), seed=3)
    pairs = np.random.default_rng(0)
    signal = pairs.uniform(100, 400, 200_000).astype(np.float32)
    observation = signal + pairs.normal(0, 1, signal.size) * np.sqrt(2 * (signal - 100) + 9)
    base = HistogramNoiseModel.fit(signal, observation.astype(np.float32), bins=64)
    model = CameraNoiseModel(base, maps)
    grid = torch.linspace(0, 600, 6001)[:, None]
    hot = torch.tensor([[90.0]])
    s = torch.tensor([[250.0]], requires_grad=True)
    density = model.pixel_log_likelihood(grid, s, hot).exp()
    assert float(density.detach().sum() * 0.1) == pytest.approx(1.0, abs=0.02)
    model.pixel_log_likelihood(torch.tensor([[260.0]]), s, hot).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_camera_model_survives_its_file_and_state(maps, tmp_path):
    model = CameraNoiseModel.from_maps(maps, (100.0, 900.0), metadata={"camera": "x"})
    loaded = load_noise_model(save_noise_model(model, tmp_path / "noise.pt"))
    assert isinstance(loaded, CameraNoiseModel)
    np.testing.assert_array_equal(loaded.maps.offset, maps.offset)
    again = noise_model_from_state(model.state())
    w = torch.tensor([[9.0], [90.0]])
    x, s = torch.tensor([[120.0], [130.0]]), torch.tensor([[110.0, 300.0]])
    torch.testing.assert_close(
        loaded.pixel_log_likelihood(x, s, w), again.pixel_log_likelihood(x, s, w)
    )
    torch.testing.assert_close(
        loaded.pixel_log_likelihood(x, s, w), model.pixel_log_likelihood(x, s, w)
    )


def test_camera_inputs_equalise_the_region_and_give_its_variance(maps):
    model = CameraNoiseModel.from_maps(maps, (100.0, 900.0))
    raw = ScmosCamera(maps).series(10.0, 2, seed=5)[:, 8:40, 4:36]
    frames, variance = model.camera_inputs(raw, (8, 4))
    region = maps.region((8, 4), (32, 32))
    np.testing.assert_allclose(frames, region.equalise(raw), rtol=1e-6)
    np.testing.assert_allclose(variance, region.pixel_variance())
    with pytest.raises(ValueError, match="outside"):
        model.camera_inputs(raw, (40, 40))
