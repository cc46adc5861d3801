"""Camera maps in Eq. 7 (training) and Eq. 10 (fused, tiled MMSE) against direct per-pixel
Gaussian computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tifffile
import torch
from serve_files import run_cli

from pn2v_live.core.inference import denoise
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import CameraNoiseModel, PoissonGaussianNoiseModel
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.core.training import Training
from pn2v_live.storage.camera_maps_file import save_camera_maps
from pn2v_live.storage.checkpoints import load_denoiser
from pn2v_live.storage.noise_model_file import save_noise_model


@pytest.fixture(scope="module")
def setup():
    maps = scmos_maps((64, 64), seed=7)
    model = CameraNoiseModel.from_maps(maps, (100.0, 900.0))
    raw, _ = ScmosCamera(maps).acquisition(2, seed=7)
    frames, variance = model.camera_inputs(raw)
    return maps, model, frames, variance


def gaussian_log_p(x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, maps) -> torch.Tensor:
    """log Normal(x; s, g·max(s − o, 0) + w), written out independently of the model."""
    offset, gain = maps.reference
    variance = gain * (s - offset).clamp(min=0) + w
    return -0.5 * ((x - s) ** 2 / variance + torch.log(2 * math.pi * variance))


def test_fused_tiled_mmse_with_maps_equals_the_naive_per_pixel_formulation(setup):
    maps, model, frames, variance = setup
    torch.manual_seed(8)
    denoiser = new_denoiser("pn2v", mean=float(frames.mean()), std=float(frames.std()), k=64,
                            features=8)  # fmt: skip
    image = frames[0]
    fused = denoise(denoiser, image, model, tile=32, chunk_elements=4096, bf16=False,
                    read_variance=variance)["denoised"]  # fmt: skip
    with torch.inference_mode():
        x = torch.from_numpy(image)
        samples = denoiser.net(denoiser.normalise(x)[None, None])[0] * denoiser.std + denoiser.mean
        log_p = gaussian_log_p(x[None], samples, torch.from_numpy(variance)[None], maps)
        naive = (torch.softmax(log_p, dim=0) * samples).sum(dim=0).numpy()
    np.testing.assert_allclose(fused, naive, rtol=1e-5)
    # The maps matter: the typical pixel's model alone gives another estimate at hot pixels.
    typical = denoise(denoiser, image, model, tile=32, bf16=False)["denoised"]
    hot = maps.hot_pixels()
    assert np.abs(typical - fused)[hot].mean() > 10 * np.abs(typical - fused)[~hot].mean()


def test_mmse_with_maps_does_not_depend_on_tiles_and_chunks_that_do_not_divide_the_frame(setup):
    """A 45×37 crop in 16² tiles and 7-pixel chunks (the last one padded) reads every pixel's
    own variance: it equals the frame in one tile and one chunk."""
    maps, model, frames, variance = setup
    torch.manual_seed(10)
    denoiser = new_denoiser("pn2v", mean=float(frames.mean()), std=float(frames.std()), k=32,
                            features=8)  # fmt: skip
    image, pixels = frames[0, 3:48, 5:42], variance[3:48, 5:42]
    whole = denoise(denoiser, image, model, tile=64, bf16=False, read_variance=pixels)
    pieces = denoise(denoiser, image, model, tile=16, chunk_elements=7 * 32, bf16=False,
                     read_variance=pixels)  # fmt: skip
    np.testing.assert_allclose(pieces["denoised"], whole["denoised"], rtol=1e-5, atol=1e-3)
    shuffled = denoise(denoiser, image, model, tile=16, chunk_elements=7 * 32, bf16=False,
                       read_variance=pixels[::-1])["denoised"]  # fmt: skip
    assert np.abs(shuffled - whole["denoised"]).max() > 0.1  # the variance really is read


def test_eq7_with_a_variance_channel_uses_each_masked_pixel_s_own_variance(setup):
    maps, model, frames, variance = setup
    torch.manual_seed(9)
    denoiser = new_denoiser("pn2v", mean=float(frames.mean()), std=float(frames.std()), k=16,
                            features=8)  # fmt: skip
    training = Training(denoiser, model, mean_weight=0.0, bf16=False)
    batch = torch.from_numpy(np.stack([np.stack([f, variance]) for f in frames]))
    with torch.no_grad():
        loss = training.loss(batch, torch.Generator().manual_seed(1))
        features, (b, y, x), _ = training.masked_features(
            batch[:, :1], torch.Generator().manual_seed(1)
        )
        weight, bias = denoiser.head_in_adu()
        samples = features @ weight.T + bias
        log_p = gaussian_log_p(
            batch[b, 0, y, x][:, None], samples, batch[b, 1, y, x][:, None], maps
        )
        expected = -(torch.logsumexp(log_p, dim=1) - math.log(16)).mean()
        without = training.loss(batch[:, :1], torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(without) != pytest.approx(float(loss), rel=1e-3)


def test_train_and_denoise_with_maps_equalise_crops_and_refuse_frames_beyond(tmp_path):
    maps = scmos_maps((64, 64), seed=11)
    raw, _ = ScmosCamera(maps).acquisition(4, seed=11)
    tifffile.imwrite(tmp_path / "raw.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp_path / "crop.tif", raw[:, 16:48, 8:40], photometric="minisblack")
    save_camera_maps(maps, tmp_path / "maps.tif")
    offset, gain = maps.reference
    plain = PoissonGaussianNoiseModel(gain, offset, 3.0, (100.0, 600.0))
    save_noise_model(plain, tmp_path / "noise.pt")
    common = ["--steps", "2", "--k", "8", "--patch-size", "32", "--context", "0:0"]
    run_cli("train", str(tmp_path / "raw.tif"), "-o", str(tmp_path / "model.pt"),
              "--noise-model", str(tmp_path / "noise.pt"), "--camera-maps",
              str(tmp_path / "maps.tif"), "--device", "cpu", *common)  # fmt: skip
    denoiser, metadata = load_denoiser(tmp_path / "model.pt")
    # Normalised on the equalised frames, and the maps travel with the model.
    assert denoiser.mean == pytest.approx(float(maps.equalise(raw).mean()), rel=1e-4)
    assert metadata["noise_model_state"]["kind"] == "camera-maps"
    run_cli("denoise", str(tmp_path / "raw.tif"), "-m", str(tmp_path / "model.pt"),
              "-o", str(tmp_path / "whole.tif"), "--device", "cpu")  # fmt: skip
    run_cli("denoise", str(tmp_path / "crop.tif"), "-m", str(tmp_path / "model.pt"),
              "-o", str(tmp_path / "crop_out.tif"), "--sensor-origin", "16,8",
              "--device", "cpu", "--tile", "32")  # fmt: skip
    whole = tifffile.imread(tmp_path / "whole.tif")
    crop = tifffile.imread(tmp_path / "crop_out.tif")
    # The crop reads its own region of the maps: in its middle it matches the whole frame up to
    # what the network sees beyond the crop (a wrong region would be off by the offsets, ~3 ADU).
    np.testing.assert_allclose(crop[:, 12:20, 12:20], whole[:, 28:36, 20:28], atol=0.3)
    beyond = run_cli(
        "denoise", str(tmp_path / "crop.tif"), "-m", str(tmp_path / "model.pt"),
        "-o", str(tmp_path / "x.tif"), "--sensor-origin", "40,8", check=False,
    )  # fmt: skip
    assert beyond.returncode != 0 and "Traceback" not in beyond.stderr
    assert "outside the camera maps" in beyond.stderr and not (tmp_path / "x.tif").exists()
