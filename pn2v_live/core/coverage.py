"""Does the data stay inside the noise model's calibrated signal range?"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pn2v_live.core.noise.base import NoiseModel

SMOOTHING_SIGMA = 1.5  # pixels; a cheap signal estimate from one noisy frame


def estimate_signal(frame: np.ndarray) -> np.ndarray:
    """Rough clean-signal estimate (ADU) of one noisy (Y, X) frame: a Gaussian blur."""
    return ndimage.gaussian_filter(np.asarray(frame, dtype=np.float32), SMOOTHING_SIGMA)


def out_of_calibration_fraction(noise_model: NoiseModel, frame: np.ndarray) -> float:
    """Fraction of pixels of `frame` whose estimated signal lies above the calibrated maximum."""
    return noise_model.out_of_range_fraction(torch.from_numpy(estimate_signal(frame)))
