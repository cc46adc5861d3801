"""How much better than raw a model's output is, measured without ground truth.

Frame pairs (`denoised_gain`, the daemon's estimate): camera noise is independent from frame to
frame, so the next frame x_{t+1} of a static scene is an independent noisy copy of frame t's
signal, and

    E[(ŝ_t − x_{t+1})²] = E[(ŝ_t − s)²] + σ²,    E[(x_t − x_{t+1})²] = 2σ²,

which give the denoised output's error and the raw frame's (σ²), hence the PSNR gain, with no
noise model. A scene that changes between the two frames adds to both errors, so the estimate is
cautious (lower than the truth), never higher.

Blind spot (`estimate_gain`, for a single frame): at a masked pixel the network's prior mean μ
never saw the pixel's own value x = s + n, so E[(x − μ)²] = E[(μ − s)²] + E[σ²(s)], with σ²
the noise model's variance (estimated without bias by σ²(x) where it grows linearly with the
signal). This is the prior mean's gain; the MMSE output also uses x and gains more, far more
early in training, so it is a loose lower bound. Noise correlated between neighbouring pixels
leaks into μ and makes it optimistic.

Uncertainties come from resampling the patches the pixels were drawn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pn2v_live.core.inference import denoise
from pn2v_live.core.model import Denoiser
from pn2v_live.core.noise.base import NoiseModel

GRID_POINTS = 2048  # observation values the noise model's variance is integrated over
SIGNAL_LEVELS = 64  # signal values it is computed at (interpolated in between)
RESAMPLES = 200  # bootstrap resamples of the patches for the uncertainty
MAX_GAIN_DB = 40.0  # reported when the estimated error is not measurably above zero


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
    variance = noise_variance(noise_model, observations).double()
    patches = torch.unique(patch_index, return_inverse=True)[1].cpu()
    n = int(patches.max()) + 1
    residual_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, patches, residual.cpu())
    variance_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, patches, variance.cpu())
    return _bootstrapped(residual_sums.numpy(), variance_sums.numpy(), len(observations), seed)


def _bootstrapped(
    residual: np.ndarray, variance: np.ndarray, pixels: int, seed: int
) -> GainEstimate:
    """The gain from per-patch sums of squared residuals and noise variances (N,), with its
    standard error over RESAMPLES resamples of the patches."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(residual), size=(RESAMPLES, len(residual)))
    resampled = [_gain_db(residual[p].sum(), variance[p].sum()) for p in picks]
    return GainEstimate(_gain_db(residual.sum(), variance.sum()), float(np.std(resampled)), pixels)


def _gain_db(residual: float, variance: float) -> float:
    """10·log10(raw error / estimate's error) from summed squared residuals (x − estimate)² and
    summed noise variances: the estimate's error is their difference."""
    error = float(residual) - float(variance)
    if error <= 0:
        return MAX_GAIN_DB
    return min(MAX_GAIN_DB, 10 * math.log10(float(variance) / error))


def denoised_gain(
    denoiser: Denoiser,
    noise_model: NoiseModel | None,
    windows: torch.Tensor,
    margin: int = 8,
    read_variance: torch.Tensor | np.ndarray | None = None,
) -> GainEstimate:
    """The gain of `denoiser`'s output from frame pairs: `windows` are (N, C + 1, Y, X) raw
    patches (ADU) of the denoiser's C-frame window plus, last, the frame after the window
    (`Context(before, after + 1)`); patches missing that frame (NaN) are left out; with camera
    maps, equalised, and `read_variance` (N, Y, X) their pixels' read-noise variance. Scored
    `margin` pixels (at most a quarter of the side) inside each patch's edges, where the network
    sees more of its own neighbourhood (the patches are denoised side by side, so near an edge it
    also sees the next patch: a worse prediction there, never a leak of the frame after)."""
    windows = windows.numpy() if isinstance(windows, torch.Tensor) else windows
    complete = ~np.isnan(windows[:, -1]).any(axis=(1, 2))
    windows = windows[complete]
    if len(windows) == 0:
        raise ValueError("no patch has the frame after its window")
    if read_variance is not None:  # side by side, as the patches below
        read_variance = np.concatenate(list(np.asarray(read_variance)[complete]), axis=-1)
    margin = min(margin, windows.shape[-1] // 4)  # small patches keep their middle half
    end = windows.shape[-1] - margin
    centre, inner = denoiser.context.before, (slice(margin, end), slice(margin, end))
    # One call on the patches side by side (C, Y, N·X): small calls cost a whole chunk each.
    count, side = len(windows), windows.shape[-1]
    mosaic = np.concatenate(list(windows[:, :-1]), axis=-1)
    denoised = denoise(denoiser, mosaic, noise_model, read_variance=read_variance)["denoised"]
    denoised = denoised.reshape(side, count, side).transpose(1, 0, 2)
    return estimate_gain_from_pairs(
        denoised[(slice(None), *inner)],
        windows[(slice(None), centre, *inner)],
        windows[(slice(None), -1, *inner)],
    )


def estimate_gain_from_pairs(
    denoised: np.ndarray, current: np.ndarray, following: np.ndarray, seed: int = 0
) -> GainEstimate:
    """The gain over raw of denoised frames, from the frame that follows each (no noise model).

    `denoised`, `current` (the raw frames denoised) and `following` (the raw frames just after
    them, never seen by the denoiser) are (N, Y, X) patches in ADU. Noise is independent from
    frame to frame, so for a static scene E[(ŝ_t − x_{t+1})²] = E[(ŝ_t − s)²] + σ² and
    E[(x_t − x_{t+1})²] = 2σ²; a scene that changes between the frames adds to both and makes
    the estimate cautious (lower), never higher.
    """
    residual = np.square(denoised - following, dtype=np.float64).mean(axis=(1, 2))
    noise = np.square(current - following, dtype=np.float64).mean(axis=(1, 2)) / 2
    return _bootstrapped(residual, noise, int(denoised.size), seed)
