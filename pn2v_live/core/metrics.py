"""Image quality metrics: PSNR with a fixed data range and the paper's affine-invariant PSNR*."""

from __future__ import annotations

import numpy as np


def psnr(prediction: np.ndarray, ground_truth: np.ndarray, data_range: float) -> float:
    """10·log10(R² / MSE) in dB, computed in float64."""
    error = np.mean(
        (np.asarray(prediction, np.float64) - np.asarray(ground_truth, np.float64)) ** 2
    )
    return float(10 * np.log10(data_range**2 / error))


def psnr_star(prediction: np.ndarray, ground_truth: np.ndarray, data_range: float) -> float:
    """PSNR after the least-squares affine fit a·prediction + b of the prediction to the truth."""
    x = np.asarray(prediction, np.float64).ravel()
    y = np.asarray(ground_truth, np.float64).ravel()
    a, b = np.polyfit(x, y, 1)
    return psnr(a * x + b, y, data_range)
