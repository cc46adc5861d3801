"""Signal-dependent Gaussian mixture noise model, after Prakash et al. ("Fully unsupervised
probabilistic Noise2Void"), built around a Poisson–Gaussian fit.

Each of C components has a weight, a mean offset and a variance factor given by polynomials of
the normalised signal u = (s − low) / (high − low); offsets and variances are relative to the
Poisson–Gaussian noise level σ(s), and the mixture mean is shifted to equal s exactly. Beyond the
calibrated range (u outside [0, 1]) the mixture's shape stays at its boundary value while σ(s)
follows the Poisson–Gaussian mean–variance line, so extrapolation stays sane.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pn2v_live.core.noise.base import NoiseModel, as_pairs, dequantised
from pn2v_live.core.noise.poisson_gaussian import PoissonGaussianNoiseModel

# Smallest component variance relative to the Poisson–Gaussian variance.
RELATIVE_VARIANCE_FLOOR = 1e-3
# Equal-width signal bins that share the fitted pairs evenly.
SIGNAL_BINS = 64


def balanced_pick(
    signal: torch.Tensor, count: int, bins: int, generator: torch.Generator
) -> torch.Tensor:
    """Indices of up to `count` random pairs, at most count // bins from each of `bins`
    equal-width signal bins (all of a bin that holds fewer).

    Calibration pairs are mostly dark background; drawn uniformly, the few bright pairs would
    barely shape the fit, yet bright signals dominate the denoising error and are where the
    hybrid model leans on this one (sparse rows, extrapolation).
    """
    order = torch.randperm(signal.numel(), generator=generator)
    low, high = float(signal.min()), float(signal.max())
    bin_of = ((signal[order] - low) / max(high - low, 1e-6) * bins).long().clamp(max=bins - 1)
    sorted_bins, position = torch.sort(bin_of, stable=True)
    counts = torch.bincount(sorted_bins, minlength=bins)
    rank = torch.arange(len(sorted_bins)) - (torch.cumsum(counts, 0) - counts)[sorted_bins]
    return order[position[rank < max(1, count // bins)]]


def polynomials(coefficients: torch.Tensor, u: torch.Tensor) -> list[torch.Tensor]:
    """Evaluate C polynomials (C, degree + 1; constant term first) at u: C tensors shaped like u.

    One tensor per component (not a trailing C axis) keeps every later step elementwise over the
    pixels × samples, which torch.compile fuses into one vectorised loop.
    """
    values = []
    for row in coefficients:
        value = row[-1].expand_as(u)
        for c in row.flip(0)[1:]:
            value = value * u + c
        values.append(value)
    return values


def logsumexp(terms: list[torch.Tensor]) -> torch.Tensor:
    """log Σ exp(terms), elementwise over a list of equally shaped tensors."""
    peak = functools.reduce(torch.maximum, terms).detach()
    return peak + sum((term - peak).exp() for term in terms).log()


class GaussianMixtureNoiseModel(NoiseModel):
    """p(x | s) = Σ_c w_c(u) · Normal(x; s + σ(s)·d_c(u), σ(s)²·v_c(u)); see the module docstring.

    `weights`, `offsets`, `variances`: (C, degree + 1) polynomial coefficients of the component
    logits, the mean offsets d_c (before centring) and the pre-softplus variance factors v_c.
    `base` is the Poisson–Gaussian model giving σ(s).
    """

    kind: ClassVar[str] = "gmm"

    def __init__(
        self,
        weights: torch.Tensor,
        offsets: torch.Tensor,
        variances: torch.Tensor,
        base: PoissonGaussianNoiseModel,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(base.signal_range, metadata)
        self.weights, self.offsets, self.variances, self.base = weights, offsets, variances, base

    @classmethod
    def fit(
        cls,
        signal: np.ndarray | torch.Tensor,
        observation: np.ndarray | torch.Tensor,
        *,
        components: int = 3,
        degree: int = 2,
        base: PoissonGaussianNoiseModel | None = None,
        steps: int = 200,
        max_pairs: int = 50_000,
        seed: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> GaussianMixtureNoiseModel:
        """Maximum likelihood by L-BFGS (full batch) on up to `max_pairs` dequantised pairs drawn
        evenly across the signal range (`balanced_pick`); `base` defaults to a Poisson–Gaussian
        fit of all the pairs."""
        signal, observation = as_pairs(signal, observation)
        base = base or PoissonGaussianNoiseModel.fit(signal, observation)
        shape = (components, degree + 1)
        weights, offsets, variances = (torch.zeros(shape) for _ in range(3))
        offsets[:, 0] = torch.linspace(-0.5, 0.5, components)
        variances[:, 0] = math.log(math.e - 1)  # softplus⁻¹(1): start at the base variance
        model = cls(weights, offsets, variances, base, metadata)
        generator = torch.Generator().manual_seed(seed)
        pick = balanced_pick(signal, max_pairs, SIGNAL_BINS, generator)
        signal, observation = signal[pick], observation[pick]
        observation = dequantised(observation, seed)
        parameters = [model.weights, model.offsets, model.variances]
        for parameter in parameters:
            parameter.requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            parameters, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = -model.log_likelihood(observation, signal).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        for parameter in parameters:
            parameter.requires_grad_(False)
        return model

    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        signal = signal.float()
        low, high = self.signal_range
        u = ((signal - low) / max(high - low, 1e-6)).clamp(0, 1)
        logits = polynomials(self.weights, u)
        log_normaliser = logsumexp(logits)
        log_weights = [logit - log_normaliser for logit in logits]
        offsets = polynomials(self.offsets, u)
        mean_offset = sum(w.exp() * d for w, d in zip(log_weights, offsets, strict=True))
        base_variance = self.base.variance(signal)
        base_sigma = base_variance.sqrt()
        difference = observation - signal
        log_components = []
        for log_weight, offset, factor in zip(
            log_weights, offsets, polynomials(self.variances, u), strict=True
        ):
            variance = base_variance * (F.softplus(factor) + RELATIVE_VARIANCE_FLOOR)
            residual = difference - (offset - mean_offset) * base_sigma
            log_normal = -0.5 * (residual**2 / variance + torch.log(2 * math.pi * variance))
            log_components.append(log_weight + log_normal)
        return logsumexp(log_components)

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "weights": self.weights.detach().cpu(),
            "offsets": self.offsets.detach().cpu(),
            "variances": self.variances.detach().cpu(),
            "base": self.base.state(),
            "signal_range": list(self.signal_range),
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GaussianMixtureNoiseModel:
        base = PoissonGaussianNoiseModel.from_state(state["base"])
        return cls(state["weights"], state["offsets"], state["variances"], base, state["metadata"])
