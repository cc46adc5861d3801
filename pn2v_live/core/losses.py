"""Training losses: PN2V's Eq. 7 and the masked MSE of N2V / supervised training."""

from __future__ import annotations

import math

import torch

from pn2v_live.core.noise.base import NoiseModel


def pn2v_loss(
    samples: torch.Tensor,
    observations: torch.Tensor,
    noise_model: NoiseModel,
    read_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 7: mean over pixels of −ln((1/K) Σ_k p(x_i | s_i^k)), with logsumexp.

    samples (P, K) and observations (P,) in ADU; `read_variance` (P,) the pixels' own read-noise
    variance for a model with camera maps (`NoiseModel.pixel_log_likelihood`).
    """
    pixels = None if read_variance is None else read_variance[:, None]
    log_p = noise_model.pixel_log_likelihood(observations[:, None], samples, pixels)
    return -(torch.logsumexp(log_p, dim=1) - math.log(samples.shape[1])).mean()


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error (in whatever units both are given)."""
    return (prediction - target).square().mean()
