"""Poisson–Gaussian camera model: x ~ Normal(s, gain · max(s − offset, 0) + read_noise²)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from pn2v_live.core.noise.base import NoiseModel, as_pairs

# Smallest variance (ADU²) the model uses, so that a zero fitted read noise stays finite.
VARIANCE_FLOOR = 0.05


@dataclass
class MeanVariance:
    """Observation variance about the signal in signal bins: the points of a mean–variance plot."""

    signal: np.ndarray  # (B,) mean signal of each bin, ADU
    variance: np.ndarray  # (B,) variance of observation − signal, ADU²
    count: np.ndarray  # (B,) pairs per bin


def mean_variance(
    signal: torch.Tensor,
    observation: torch.Tensor,
    bins: int = 64,
    min_count: int = 200,
    signal_frames: int | None = None,
) -> MeanVariance:
    """Bin 1-D pairs by signal (equal widths) and measure the variance of x − s in each bin.

    If the signal is the mean of `signal_frames` frames that include the observations, the
    residual variance is (1 − 1/T) of the noise variance; this is corrected. Bins with fewer than
    `min_count` pairs are dropped.
    """
    low, high = float(signal.min()), float(signal.max())
    index = ((signal - low) / max(high - low, 1e-12) * bins).long().clamp(0, bins - 1)
    residual = (observation - signal).double()
    count = torch.bincount(index, minlength=bins).double()
    mean_s = torch.bincount(index, signal.double(), minlength=bins) / count.clamp(min=1)
    mean_r = torch.bincount(index, residual, minlength=bins) / count.clamp(min=1)
    square_r = torch.bincount(index, residual**2, minlength=bins) / count.clamp(min=1)
    variance = (square_r - mean_r**2) * count / (count - 1).clamp(min=1)
    if signal_frames:
        variance = variance / (1.0 - 1.0 / signal_frames)
    keep = count >= min_count
    return MeanVariance(mean_s[keep].numpy(), variance[keep].numpy(), count[keep].numpy())


def darkest_level(frames: np.ndarray, fraction: float = 0.05) -> float:
    """Estimate the signal of the scene's darkest pixels (ADU) from a stack (T, Y, X), T ≥ 2.

    Pixels are chosen by the mean of the even frames and measured on the mean of the odd ones,
    so the choice does not bias the level low. With a dark background this is the camera offset.
    """
    frames = np.asarray(frames, dtype=np.float32)
    chosen_by = frames[0::2].mean(0).ravel()
    measured = frames[1::2].mean(0).ravel()
    darkest = np.argsort(chosen_by)[: max(1, int(fraction * chosen_by.size))]
    return float(measured[darkest].mean())


class PoissonGaussianNoiseModel(NoiseModel):
    """Gaussian with signal-dependent variance gain · max(s − offset, 0) + read_noise².

    gain in ADU per photo-electron, offset and read_noise in ADU. Smooth everywhere, so outside
    the calibrated range it extrapolates the linear mean–variance relation.
    """

    kind: ClassVar[str] = "poisson-gaussian"

    def __init__(
        self,
        gain: float,
        offset: float,
        read_noise: float,
        signal_range: tuple[float, float],
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(signal_range, metadata)
        self.gain, self.offset, self.read_noise = float(gain), float(offset), float(read_noise)

    @classmethod
    def fit(
        cls,
        signal: np.ndarray | torch.Tensor,
        observation: np.ndarray | torch.Tensor,
        *,
        offset: float | None = None,
        signal_frames: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> PoissonGaussianNoiseModel:
        """Weighted least-squares line through the binned mean–variance points.

        `offset` is the camera's black level (e.g. from `darkest_level`); without it the lowest
        binned signal is used, so read_noise is then the noise at the scene's darkest level.
        See `mean_variance` for `signal_frames`.
        """
        signal, observation = as_pairs(signal, observation)
        points = mean_variance(signal, observation, signal_frames=signal_frames)
        if len(points.signal) < 2:
            raise ValueError("too few signal levels to fit a mean–variance line")
        # Var of a sample variance is about 2σ⁴/n: weight each point by n / σ⁴.
        weight = points.count / np.maximum(points.variance, VARIANCE_FLOOR) ** 2
        design = np.stack([points.signal, np.ones_like(points.signal)], 1)
        root = np.sqrt(weight)[:, None]
        (gain, intercept), *_ = np.linalg.lstsq(design * root, points.variance * root[:, 0])
        offset = float(points.signal.min()) if offset is None else float(offset)
        read_variance = intercept + gain * offset
        read_noise = math.sqrt(max(read_variance, VARIANCE_FLOOR))
        signal_range = (float(signal.min()), float(signal.max()))
        return cls(max(gain, 0.0), offset, read_noise, signal_range, metadata)

    def variance(self, signal: torch.Tensor) -> torch.Tensor:
        """Noise variance (ADU²) at `signal`."""
        shot = self.gain * (signal - self.offset).clamp(min=0)
        return (shot + self.read_noise**2).clamp(min=VARIANCE_FLOOR)

    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        variance = self.variance(signal.float())
        return -0.5 * ((observation - signal) ** 2 / variance + torch.log(2 * math.pi * variance))

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "gain": self.gain,
            "offset": self.offset,
            "read_noise": self.read_noise,
            "signal_range": list(self.signal_range),
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PoissonGaussianNoiseModel:
        return cls(
            state["gain"],
            state["offset"],
            state["read_noise"],
            tuple(state["signal_range"]),
            state["metadata"],
        )
