"""`pn2v-live train`, `denoise`, `evaluate` on real files, in real processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from serve_files import run_cli

from pn2v_live.core.context import Context, window
from pn2v_live.core.inference import denoise
from pn2v_live.core.metrics import psnr, psnr_star
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import HistogramNoiseModel
from pn2v_live.core.synthetic import Camera, acquisition
from pn2v_live.storage.checkpoints import load_denoiser, save_denoiser
from pn2v_live.storage.noise_model_file import load_noise_model, save_noise_model


@pytest.fixture(scope="module")
def camera_data(tmp_path_factory) -> dict[str, Path]:
    """A small synthetic acquisition: noisy stack, clean truth and a fitted noise model."""
    folder = tmp_path_factory.mktemp("camera")
    camera = Camera(gain=2.0, offset=100.0, read_noise=3.0)
    frames, clean = acquisition(camera, frames=6, shape=(64, 64), seed=3)
    tifffile.imwrite(folder / "raw.tif", frames)
    tifffile.imwrite(folder / "gt.tif", clean)
    save_noise_model(HistogramNoiseModel.fit(clean, frames), folder / "camera.pt")
    return {"raw": folder / "raw.tif", "gt": folder / "gt.tif", "noise": folder / "camera.pt"}


def test_train_denoise_evaluate_round_trip(camera_data, tmp_path):
    model, output, std = tmp_path / "m.pt", tmp_path / "den.tif", tmp_path / "std.tif"
    trained = run_cli("train", str(camera_data["raw"]), "-o", str(model), "--mode", "pn2v",
                        "--noise-model", str(camera_data["noise"]), "--steps", "4", "--k", "16",
                        "--batch-size", "2", "--patch-size", "32", "--context", "0:0")  # fmt: skip
    assert json.loads(trained.stdout.strip().splitlines()[-1])["step"] == 4
    run_cli("denoise", str(camera_data["raw"]), "-m", str(model), "-o", str(output),
              "--frames", "1:3", "--uncertainty", str(std), "--device", "cpu")  # fmt: skip
    denoised = tifffile.imread(output)
    assert denoised.shape == (2, 64, 64) and denoised.dtype == np.float32
    assert tifffile.imread(std).shape == (2, 64, 64)
    # The file equals what the library computes with the saved model.
    denoiser, metadata = load_denoiser(model)
    raw = tifffile.imread(camera_data["raw"])
    noise = HistogramNoiseModel.from_state(metadata["noise_model_state"])
    np.testing.assert_allclose(denoised[0], denoise(denoiser, raw[1], noise)["denoised"], rtol=1e-5)
    scores = json.loads(run_cli("evaluate", str(output), str(camera_data["gt"])).stdout)
    truth = tifffile.imread(camera_data["gt"])
    assert scores["frames"] == 2
    span = float(truth.max() - truth.min())  # the default range: the ground truth's own
    assert scores["data_range"] == pytest.approx(span)
    assert scores["psnr"] == pytest.approx(np.mean([psnr(d, truth, span) for d in denoised]))
    assert scores["psnr_star"] == pytest.approx(
        np.mean([psnr_star(d, truth, span) for d in denoised])
    )


def test_context_auto_trains_the_best_candidate_and_denoise_uses_its_window(camera_data, tmp_path):
    model, output, live = tmp_path / "m.pt", tmp_path / "den.tif", tmp_path / "live.tif"
    trained = run_cli("train", str(camera_data["raw"]), "-o", str(model), "--mode", "pn2v",
                        "--noise-model", str(camera_data["noise"]), "--steps", "24", "--k", "16",
                        "--batch-size", "2", "--patch-size", "32")  # fmt: skip
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    denoiser, metadata = load_denoiser(model)
    losses = metadata["context_validation_loss"]
    assert set(losses) == {"0:0", "1:1"}  # 6 frames: the 7- and 11-frame windows are left out
    assert str(denoiser.context) == summary["context"] == min(losses, key=losses.get)
    # the winner's pilot (3: a quarter of 24 shared by 2) and the 24 less the single frame's
    # start (a quarter: 6) and 2 pilots of 3; a temporal winner started fresh, the single frame
    # after its start
    head_start = 6 if denoiser.context == Context(0, 0) else 0
    assert summary["total_steps"] == head_start + 3 + 12
    # denoise gives each frame its window of the whole stack, frames outside --frames included
    for extra, path in (([], output), (["--causal"], live)):
        run_cli("denoise", str(camera_data["raw"]), "-m", str(model), "-o", str(path),
                  "--frames", "1:3", "--device", "cpu", *extra)  # fmt: skip
    raw = tifffile.imread(camera_data["raw"])
    noise = HistogramNoiseModel.from_state(metadata["noise_model_state"])
    context = Context(1, 1)
    if denoiser.context != context:  # test the window handling with a model that has one
        denoiser = new_denoiser("pn2v", denoiser.mean, denoiser.std, k=16, context=context)
        save_denoiser(denoiser, model, metadata)
        for extra, path in (([], output), (["--causal"], live)):
            run_cli("denoise", str(camera_data["raw"]), "-m", str(model), "-o", str(path),
                      "--frames", "1:3", "--device", "cpu", *extra)  # fmt: skip
    for path, visible in ((output, context), (live, context.causal)):
        expected = [denoise(denoiser, window(raw, t, context, visible), noise)["denoised"]
                    for t in (1, 2)]  # fmt: skip
        np.testing.assert_allclose(tifffile.imread(path), np.stack(expected), rtol=1e-5)
    assert not np.allclose(tifffile.imread(output), tifffile.imread(live))
    for bad, message in (("1-1", "must look like A:B"), ("3:3", "needs 7 frames, not 6")):
        refused = run_cli("train", str(camera_data["raw"]), "-o", str(tmp_path / "x.pt"),
                            "--mode", "n2v", "--steps", "1", "--context", bad,
                            check=False)  # fmt: skip
        assert refused.returncode == 2 and message in refused.stderr
        assert "Traceback" not in refused.stderr


def test_user_mistakes_give_one_line_errors(camera_data, tmp_path):
    missing = run_cli("train", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "m.pt"),
                        "--mode", "n2v", "--steps", "1", check=False)  # fmt: skip
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error:") and "nope.tif" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_budget = run_cli("train", str(camera_data["raw"]), "-o", str(tmp_path / "m.pt"),
                          "--mode", "n2v", check=False)  # fmt: skip
    assert no_budget.returncode == 2 and "--steps" in no_budget.stderr
    no_noise = run_cli("train", str(camera_data["raw"]), "-o", str(tmp_path / "m.pt"),
                         "--steps", "1", check=False)  # fmt: skip
    assert no_noise.returncode == 2 and "--noise-model" in no_noise.stderr
    odd_patch = run_cli("train", str(camera_data["raw"]), "-o", str(tmp_path / "m.pt"),
                          "--mode", "n2v", "--steps", "1", "--patch-size", "30",
                          check=False)  # fmt: skip
    assert odd_patch.returncode == 2 and "Traceback" not in odd_patch.stderr
    assert "patch size 30 must be a multiple of 4" in odd_patch.stderr
    no_steps = run_cli("train", str(camera_data["raw"]), "-o", str(tmp_path / "m.pt"),
                         "--mode", "n2v", "--steps", "0", check=False)  # fmt: skip
    assert no_steps.returncode == 2 and "Traceback" not in no_steps.stderr
    beyond = run_cli("denoise", str(camera_data["raw"]), "-m", str(camera_data["raw"]),
                       "-o", str(tmp_path / "x.tif"), "--frames", "10:20", check=False)  # fmt: skip
    assert beyond.returncode == 2 and "selects none of the 6 frames" in beyond.stderr
    no_range = run_cli("evaluate", str(camera_data["raw"]), str(camera_data["gt"]),
                         "--data-range", "0", check=False)  # fmt: skip
    assert no_range.returncode == 2 and "--data-range must be > 0" in no_range.stderr
    not_model = run_cli("denoise", str(camera_data["raw"]), "-m", str(camera_data["raw"]),
                          "-o", str(tmp_path / "x.tif"), check=False)  # fmt: skip
    assert not_model.returncode == 2 and "not a pn2v-live model file" in not_model.stderr
    assert not (tmp_path / "x.tif").exists()


def test_checkpoint_round_trip_keeps_weights_normalisation_and_history(tmp_path):
    torch.manual_seed(0)
    denoiser = new_denoiser("n2v", mean=12.5, std=3.0, features=8)
    denoiser.history = [{"step": 1, "validation_loss": 0.5}]
    save_denoiser(denoiser, tmp_path / "model.pt", {"note": "x"})
    loaded, metadata = load_denoiser(tmp_path / "model.pt")
    assert (loaded.mode, loaded.mean, loaded.std, loaded.k) == ("n2v", 12.5, 3.0, 1)
    assert loaded.history == denoiser.history and metadata == {"note": "x"}
    for name, tensor in denoiser.net.state_dict().items():
        assert torch.equal(tensor, loaded.net.state_dict()[name])


def test_synthetic_camera_has_the_stated_mean_and_variance():
    camera = Camera(gain=2.0, offset=100.0, read_noise=3.0)
    signal = np.full((200, 200), 300.0)
    frames = np.stack([camera.expose(signal, np.random.default_rng(i)) for i in range(5)])
    assert frames.mean() == pytest.approx(300, abs=0.3)
    assert frames.astype(float).var() == pytest.approx(2.0 * 200 + 9 + 1 / 12, rel=0.03)


@pytest.mark.parametrize("kind", ["histogram", "poisson-gaussian", "gmm", "hybrid"])
def test_fit_noise_model_writes_the_kind_and_reports_its_likelihood(camera_data, kind, tmp_path):
    output = tmp_path / f"{kind}.pt"
    completed = run_cli(
        "fit-noise-model", "--signal", str(camera_data["gt"]), "--observations",
        str(camera_data["raw"]), "-o", str(output), "--kind", kind, "--bins", "64",
    )  # fmt: skip
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    model = load_noise_model(output)
    assert summary["kind"] == model.kind == kind and summary["output"] == str(output)
    frames, clean = tifffile.imread(camera_data["raw"]), tifffile.imread(camera_data["gt"])
    assert summary["nll"] == pytest.approx(model.nll(clean, frames), abs=1e-5)
    if kind == "poisson-gaussian":  # the synthetic camera: variance 2·(s − 100) + 3²
        levels = torch.tensor([float(clean.min()), float(clean.max())])
        expected = 2.0 * (levels - 100.0) + 9.0
        np.testing.assert_allclose(model.variance(levels), expected, rtol=0.15)
