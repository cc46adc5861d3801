"""Noise models p(x | s): the paper's histogram, parametric fits, and the hybrid of both."""

from pn2v_live.core.noise.base import NoiseModel, as_pairs, noise_model_from_state
from pn2v_live.core.noise.camera import CameraNoiseModel
from pn2v_live.core.noise.coverage import coverage_warning, out_of_calibration_ratio
from pn2v_live.core.noise.gmm import GaussianMixtureNoiseModel
from pn2v_live.core.noise.histogram import HistogramNoiseModel
from pn2v_live.core.noise.hybrid import HybridNoiseModel
from pn2v_live.core.noise.poisson_gaussian import PoissonGaussianNoiseModel, darkest_level
from pn2v_live.core.noise.refined import RefinedNoiseModel

__all__ = [
    "CameraNoiseModel",
    "GaussianMixtureNoiseModel",
    "HistogramNoiseModel",
    "HybridNoiseModel",
    "NoiseModel",
    "PoissonGaussianNoiseModel",
    "RefinedNoiseModel",
    "as_pairs",
    "coverage_warning",
    "out_of_calibration_ratio",
    "darkest_level",
    "noise_model_from_state",
]
