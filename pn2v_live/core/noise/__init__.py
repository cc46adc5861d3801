"""Noise models p(x | s): the paper's histogram, parametric fits, and the hybrid of both."""

from pn2v_live.core.noise.base import NoiseModel, as_pairs, noise_model_from_state
from pn2v_live.core.noise.histogram import HistogramNoiseModel
from pn2v_live.core.noise.poisson_gaussian import PoissonGaussianNoiseModel, darkest_level

__all__ = [
    "HistogramNoiseModel",
    "NoiseModel",
    "PoissonGaussianNoiseModel",
    "as_pairs",
    "darkest_level",
    "noise_model_from_state",
]
