"""Does an image stay inside the signal range a noise model was calibrated on?"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from pn2v_live.core.noise.base import NoiseModel

# Above this fraction of pixels beyond the calibrated maximum, users are warned.
WARN_FRACTION = 1e-3


def estimate_signal(image: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Rough clean signal (Y, X) ADU of a noisy frame: a Gaussian blur of `sigma` pixels."""
    return ndimage.gaussian_filter(np.asarray(image, dtype=np.float32), sigma)


def out_of_calibration_ratio(model: NoiseModel, image: np.ndarray) -> float:
    """Fraction of the frame's pixels whose estimated signal lies above the calibrated maximum."""
    return model.out_of_range_fraction(torch.from_numpy(estimate_signal(image)))


def coverage_warning(model: NoiseModel, image: np.ndarray) -> str | None:
    """A message for the log when more than WARN_FRACTION of the frame's estimated signal lies
    above the noise model's calibrated range, else None."""
    ratio = out_of_calibration_ratio(model, image)
    if ratio <= WARN_FRACTION:
        return None
    brightest = float(estimate_signal(image).max())
    return (
        f"{ratio:.2%} of the pixels (estimated signal up to {brightest:.0f} ADU) lie above the "
        f"noise model's calibrated range {model.signal_range[0]:.0f}–{model.signal_range[1]:.0f} "
        f"ADU; the {model.kind} model extrapolates there — recalibrate with a brighter sample "
        "for best results"
    )
