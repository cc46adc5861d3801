"""The mathematics of noise calibration, beside the noise models it fits: the checks of a
static scene (frame shift, brightness drift, clipped pixels), the split into fitting and
held-out frames, the (signal, observation) pairs and the fits of every model kind.

The workflow that reads acquisitions, refuses bad ones and writes models and reports is
`calibration.workflow`; the daemon's noise-model refinement fits with `fit_models` too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pn2v_live.core.noise import (
    GaussianMixtureNoiseModel,
    HistogramNoiseModel,
    HybridNoiseModel,
    NoiseModel,
    PoissonGaussianNoiseModel,
    as_pairs,
)
from pn2v_live.core.noise.histogram import common_range, finite_pairs
from pn2v_live.core.registration import shift_between

log = logging.getLogger(__name__)

HELD_OUT_FRACTION = 0.2  # of every acquisition's frames, the last ones, held back for scoring
MIN_PAIRS_PER_ROW = 100  # average calibration pairs per occupied histogram row


@dataclass
class CalibrationResult:
    """Fitted models (kind → model), which one is chosen, the Poisson–Gaussian fit (always made),
    the fitting pairs (1-D signal, observation), the summary numbers and warnings."""

    models: dict[str, NoiseModel]
    chosen: str
    poisson_gaussian: PoissonGaussianNoiseModel
    pairs: tuple[torch.Tensor, torch.Tensor]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def frame_shift(frames: np.ndarray) -> tuple[int, tuple[float, float]] | None:
    """Largest displacement (frame index, (dy, dx) px) of any frame against the mean of the
    others (`registration.shift_between`). Frames without enough structure to register are
    skipped; None when no frame could be registered."""
    frames = frames.astype(np.float32)
    total = frames.sum(0)
    worst: tuple[int, tuple[float, float]] | None = None
    for index, frame in enumerate(frames):
        shift = shift_between(frame, (total - frame) / (len(frames) - 1))
        if shift is None:
            continue
        if worst is None or max(map(abs, shift)) > max(map(abs, worst[1])):
            worst = (index, shift)
    return worst


def brightness_drift(frames: np.ndarray) -> tuple[float, float]:
    """Brightness change from the first to the last frame of a (T ≥ 4, Y, X) series, as a
    fraction, and its standard error: the straight-line trend over time of each frame's gain
    against the series mean (least squares, frame ≈ gain · mean + offset)."""
    mean = frames.mean(0, dtype=np.float64).ravel()
    centred = mean - mean.mean()
    gains = [np.dot(frame.ravel(), centred) / np.dot(centred, centred) for frame in frames]
    (slope, _), covariance = np.polyfit(np.arange(len(frames)), gains, 1, cov=True)
    span = len(frames) - 1
    return float(abs(slope) * span), float(np.sqrt(covariance[0, 0]) * span)


def clipped_fraction(frames: np.ndarray) -> tuple[float, float]:
    """Fractions of pixels at the camera dtype's maximum and minimum (0 for float data)."""
    if not np.issubdtype(frames.dtype, np.integer):
        return 0.0, 0.0
    info = np.iinfo(frames.dtype)
    return float(np.mean(frames == info.max)), float(np.mean(frames == info.min))


def split(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames for fitting and the held-back last HELD_OUT_FRACTION (at least one)."""
    held = max(1, round(HELD_OUT_FRACTION * len(frames)))
    return frames[:-held], frames[-held:]


def gather_pairs(
    stacks: list[np.ndarray], signals: list[np.ndarray]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(signal, observation) 1-D pairs for fitting and for held-out scoring, all acquisitions.

    `stacks` are each acquisition's frames (T, Y, X); each signal is (Y, X) for a static scene
    or (T, Y, X) per frame (bootstrap)."""
    fit, held = [], []
    for frames, signal in zip(stacks, signals, strict=True):
        fit_frames, held_frames = split(frames)
        fit_signal, held_signal = split(signal) if signal.ndim == 3 else (signal, signal)
        fit.append(as_pairs(fit_signal, fit_frames))
        held.append(as_pairs(held_signal, held_frames))
    concatenated = [
        tuple(torch.cat(part) for part in zip(*group, strict=True)) for group in (fit, held)
    ]
    return concatenated[0], concatenated[1]


def fit_models(
    kinds: tuple[str, ...],
    signal: torch.Tensor,
    observation: torch.Tensor,
    bins: int,
    poisson_gaussian: PoissonGaussianNoiseModel | None = None,
) -> dict[str, NoiseModel]:
    """Fit the requested kinds on 1-D pairs (the parametric parts first: others build on them);
    the result also holds the Poisson–Gaussian and GMM fits the others were built on.
    `poisson_gaussian` is fitted from the pairs when not given and a kind needs it."""
    signal, observation = finite_pairs(signal, observation)  # NaN: missing frames or pixels
    models: dict[str, NoiseModel] = {}
    if {"poisson-gaussian", "gmm", "hybrid"} & set(kinds):
        poisson_gaussian = poisson_gaussian or PoissonGaussianNoiseModel.fit(signal, observation)
        models["poisson-gaussian"] = poisson_gaussian
    if {"gmm", "hybrid"} & set(kinds):
        log.info("fitting the Gaussian mixture model")
        models["gmm"] = GaussianMixtureNoiseModel.fit(signal, observation, base=poisson_gaussian)
    value_range = common_range(signal, observation, bins)
    if "histogram" in kinds:
        models["histogram"] = HistogramNoiseModel.fit(
            signal, observation, value_range=value_range, bins=bins
        )
    if "hybrid" in kinds:
        models["hybrid"] = HybridNoiseModel.fit(
            signal, observation, models["gmm"], bins=bins, value_range=value_range
        )
    return models
