"""Image quality metrics: PSNR with a fixed data range and the paper's affine-invariant PSNR*,
and the least-squares affine fit between two images of one scene that PSNR* rests on."""

from __future__ import annotations

import numpy as np


def psnr(prediction: np.ndarray, ground_truth: np.ndarray, data_range: float) -> float:
    """10·log10(R² / MSE) in dB, computed in float64."""
    error = np.mean(
        (np.asarray(prediction, np.float64) - np.asarray(ground_truth, np.float64)) ** 2
    )
    return float(10 * np.log10(data_range**2 / error))


def affine_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) minimising Σ (a·x + b − y)² over all pixels of the same-shaped `x` and `y`
    (float64). Zero-mean noise in `y` leaves it unbiased, so it measures one frame's
    brightness against another image of the same scene."""
    a, b = np.polyfit(np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel(), 1)
    return float(a), float(b)


def psnr_star(prediction: np.ndarray, ground_truth: np.ndarray, data_range: float) -> float:
    """PSNR after the least-squares affine fit a·prediction + b of the prediction to the truth."""
    a, b = affine_fit(prediction, ground_truth)
    return psnr(a * np.asarray(prediction, np.float64) + b, ground_truth, data_range)
