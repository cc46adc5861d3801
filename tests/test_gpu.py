"""The CUDA path (bf16 body, fp32 likelihood) agrees with the CPU fp32 result. Runs only where
a CUDA GPU is present; everything else in the suite covers the CPU path."""

from __future__ import annotations

import pytest
import torch

from pn2v_live.core.inference import denoise
from pn2v_live.core.metrics import psnr
from pn2v_live.core.model import new_denoiser, normalisation_of
from pn2v_live.core.noise import HistogramNoiseModel
from pn2v_live.core.patches import sample_patches
from pn2v_live.core.training import Training
from pn2v_live.service.bench.quality import load_field

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_mmse_matches_cpu_within_005_db_on_a_real_frame(data_dir):
    import numpy as np

    raw, truth = load_field(data_dir, "fov01")
    noise_model = HistogramNoiseModel.fit(raw.mean(0), raw)
    torch.manual_seed(0)
    denoiser = new_denoiser("pn2v", *normalisation_of(list(raw[:5])), k=800)
    training = Training(denoiser, noise_model)
    rng = np.random.default_rng(0)
    for _ in range(20):  # a few steps so the prior is not flat
        training.step(sample_patches(list(raw), 8, 96, rng))
    cpu = denoise(denoiser, raw[0], noise_model)["denoised"]
    denoiser.net.to("cuda")
    gpu = denoise(denoiser, raw[0], noise_model.to("cuda"), compiled=True)["denoised"]
    assert abs(psnr(gpu, truth, 255) - psnr(cpu, truth, 255)) < 0.05


def test_gpu_training_step_runs_and_lowers_the_loss(data_dir):
    import numpy as np

    raw, _ = load_field(data_dir, "fov01")
    noise_model = HistogramNoiseModel.fit(raw.mean(0), raw).to("cuda")
    denoiser = new_denoiser("pn2v", *normalisation_of(list(raw[:5])), k=800)
    denoiser.net.to("cuda")
    training = Training(denoiser, noise_model)
    batch = sample_patches(list(raw), 20, 100, np.random.default_rng(1))
    first = training.validation_loss(batch)
    for _ in range(30):
        training.step(batch)
    assert training.validation_loss(batch) < first


def test_bench_naive_baseline_runs_on_the_gpu_and_needs_more_memory_than_the_fused_mmse():
    from pn2v_live.service.bench.algorithm import bench_predict

    result = bench_predict(256, 800, torch.device("cuda"), 1, "naive")
    # float32 convolutions run in TF32 on CUDA (PyTorch's default), on both sides
    assert result["max_relative_difference"] < 1e-2
    assert result["peak_gpu_mb"] < result["baseline"]["peak_gpu_mb"]  # no K×H×W for the frame
