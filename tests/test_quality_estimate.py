"""The ground-truth-free gain estimate (core.quality) against closed-form and known truths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.core.quality import estimate_gain, noise_variance

NOISE = PoissonGaussianNoiseModel(gain=2.0, offset=10.0, read_noise=3.0, signal_range=(10, 200))


def test_noise_variance_is_the_models_variance():
    signal = torch.tensor([10.0, 25.0, 60.0, 120.0, 199.0])
    expected = 2.0 * (signal - 10.0) + 9.0  # gain · (s − offset) + read noise²
    assert torch.allclose(noise_variance(NOISE, signal), expected, rtol=0.01)


@pytest.mark.parametrize("error_std", [4.0, 8.0, 20.0])
def test_estimate_matches_the_known_gain_of_a_prediction_blind_to_its_pixel(error_std):
    """A prior mean μ = s + e, e independent of the pixel's noise: its true gain over raw is
    10·log10(mean σ²(s) / mean e²), which the estimate recovers from x and μ alone."""
    rng = np.random.default_rng(1)
    patches, per_patch = 200, 256
    signal = torch.from_numpy(rng.uniform(15, 190, size=patches * per_patch)).float()
    variance = 2.0 * (signal - 10.0) + 9.0
    observed = signal + variance.sqrt() * torch.from_numpy(rng.standard_normal(signal.numel()))
    error = torch.from_numpy(rng.normal(0, error_std, size=signal.numel())).float()
    patch_index = torch.arange(patches).repeat_interleave(per_patch)
    estimate = estimate_gain(signal + error, observed.float(), patch_index, NOISE)
    truth = 10 * math.log10(float(variance.mean()) / float(error.square().mean()))
    assert estimate.pixels == signal.numel()
    assert abs(estimate.gain_db - truth) < max(0.3, 3 * estimate.uncertainty_db)
    assert 0 < estimate.uncertainty_db < 1.0
    assert estimate.lower_db == pytest.approx(estimate.gain_db - 2 * estimate.uncertainty_db)


def test_a_prediction_worse_than_raw_has_a_negative_gain():
    rng = np.random.default_rng(2)
    signal = torch.full((4000,), 100.0)
    noisy = signal + torch.from_numpy(rng.normal(0, math.sqrt(189.0), 4000)).float()
    wrong = signal + 30.0  # biased by 30 ADU: error 900 ADU² against noise variance 189 ADU²
    estimate = estimate_gain(wrong, noisy, torch.arange(4000) // 40, NOISE)
    assert estimate.gain_db == pytest.approx(10 * math.log10(189 / 900), abs=0.5)
