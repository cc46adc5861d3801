"""How much better than raw a model is, measured without ground truth.

At a blind-spot pixel the network's prior mean μ never saw the pixel's own value x = s + n, so
the noise n is independent of μ − s and

    E[(x − μ)²] = E[(μ − s)²] + E[σ²(s)],

where σ²(s) is the noise model's variance at signal s. The prior mean's error against the
unknown truth is therefore mean((x − μ)²) − mean(σ²), and the raw frame's own error is
mean(σ²). Their ratio, in dB, is the gain of the prior mean over raw; the MMSE estimate also
uses x and is at least as close to the truth on average, so this gain is a cautious estimate of
the denoised output's gain. Its uncertainty comes from resampling the patches the pixels were
drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pn2v_live.core.noise.base import NoiseModel

GRID_POINTS = 2048  # observation values the noise model's variance is integrated over
SIGNAL_LEVELS = 64  # signal values it is computed at (interpolated in between)
RESAMPLES = 200  # bootstrap resamples of the patches for the uncertainty
MAX_GAIN_DB = 40.0  # reported when the prior mean's error is not measurably above zero


@dataclass(frozen=True)
class GainEstimate:
    """Estimated PSNR gain over raw (dB) with its standard error (dB), from `pixels` pixels."""

    gain_db: float
    uncertainty_db: float
    pixels: int

    @property
    def lower_db(self) -> float:
        """A cautious lower bound: the estimate less two standard errors."""
        return self.gain_db - 2 * self.uncertainty_db


def noise_variance(noise_model: NoiseModel, signal: torch.Tensor) -> torch.Tensor:
    """Var(x | s) in ADU² for every value of `signal` (any shape, ADU), integrated numerically
    from the noise model's density over a grid wide enough for the model's noise."""
    signal = signal.detach().float()
    low, high = float(signal.min()), float(signal.max())
    calibrated = noise_model.signal_range
    span = max(high - low, calibrated[1] - calibrated[0], 1.0)
    grid = torch.linspace(low - span, high + span, GRID_POINTS, device=signal.device)
    levels = torch.linspace(low, high, SIGNAL_LEVELS, device=signal.device)
    with torch.no_grad():
        density = noise_model.log_likelihood(grid[None, :], levels[:, None]).exp()
    density = density / density.sum(dim=1, keepdim=True)
    mean = (density * grid).sum(dim=1, keepdim=True)
    variance = (density * (grid - mean).square()).sum(dim=1)
    if high == low:
        return variance[0].expand_as(signal).clone()
    position = (signal - low) / (high - low) * (SIGNAL_LEVELS - 1)
    below = position.floor().clamp(0, SIGNAL_LEVELS - 2).long()
    share = position - below
    return variance[below] * (1 - share) + variance[below + 1] * share


def estimate_gain(
    prior_mean: torch.Tensor,
    observations: torch.Tensor,
    patch_index: torch.Tensor,
    noise_model: NoiseModel,
    seed: int = 0,
) -> GainEstimate:
    """The gain of the prior mean over raw (see the module docstring) from P blind-spot pixels:
    `prior_mean` and `observations` (P,) in ADU, `patch_index` (P,) the patch each came from."""
    residual = (observations - prior_mean).double().square()
    variance = noise_variance(noise_model, prior_mean).double()
    patches = torch.unique(patch_index, return_inverse=True)[1]
    n = int(patches.max()) + 1
    residual_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, patches.cpu(), residual.cpu())
    variance_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, patches.cpu(), variance.cpu())
    gain = _gain_db(residual_sums.sum(), variance_sums.sum())
    rng = np.random.default_rng(seed)
    picks = torch.from_numpy(rng.integers(0, n, size=(RESAMPLES, n)))
    resampled = [_gain_db(residual_sums[p].sum(), variance_sums[p].sum()) for p in picks]
    return GainEstimate(gain, float(np.std(resampled)), len(observations))


def _gain_db(residual: torch.Tensor, variance: torch.Tensor) -> float:
    """10·log10(raw error / prior-mean error) from summed squared residuals and variances."""
    error = float(residual - variance)
    if error <= 0:
        return MAX_GAIN_DB
    return min(MAX_GAIN_DB, 10 * math.log10(float(variance) / error))
