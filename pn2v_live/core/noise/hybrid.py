"""Hybrid noise model: the paper's histogram where calibration data is dense, a parametric model
(Gaussian mixture or Poisson–Gaussian) where it is sparse, empty or out of range.

Each histogram row r with n_r calibration pairs (pixel × frame) becomes

    p_r = (1 − f) · (counts_r + n₀ · q_r) / (n_r + n₀) + f · q_r

where q_r are the parametric model's bin probabilities at the row's signal, n₀ = `prior_pairs`
(a row with n₀ pairs is half histogram, half parametric) and f = `floor_ratio`. So an empty row
is exactly parametric, and no entry is ever below f times the parametric probability of its bin
(nor below the histogram's DENSITY_FLOOR, where the parametric probability underflows).
Signals or observations outside the table use the parametric model (extrapolation).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from pn2v_live.core.noise.base import NoiseModel, noise_model_from_state
from pn2v_live.core.noise.histogram import (
    DENSITY_FLOOR,
    BinnedTable,
    HistogramNoiseModel,
    binned_pairs,
    table_arguments,
)

PRIOR_PAIRS = 1000.0
FLOOR_RATIO = 0.01


def bin_probabilities(model: NoiseModel, table: BinnedTable, points: int = 8) -> torch.Tensor:
    """(bins, bins) probability of each observation bin at each row-centre signal under `model`,
    averaging the density over `points` evenly spaced observations inside each bin."""
    centres = table.row_centres()
    inside = (torch.arange(points, dtype=torch.float32) + 0.5) / points
    edges = table.low + table.width * torch.arange(table.bins, dtype=torch.float32)
    observations = (edges[:, None] + table.width * inside).reshape(-1)
    with torch.no_grad():
        log_p = model.log_likelihood(observations[None, :], centres[:, None])
    return log_p.exp().view(table.bins, table.bins, points).mean(-1) * table.width


class HybridNoiseModel(HistogramNoiseModel):
    """Histogram blended with `parametric` by row support; see the module docstring."""

    kind: ClassVar[str] = "hybrid"

    def __init__(self, *table: Any, parametric: NoiseModel):
        """`table`: the histogram's arguments (see `HistogramNoiseModel`); `parametric`: the
        model blended in and used outside the table."""
        super().__init__(*table)
        self.parametric = parametric

    @classmethod
    def fit(
        cls,
        signal: np.ndarray | torch.Tensor,
        observation: np.ndarray | torch.Tensor,
        parametric: NoiseModel,
        *,
        bins: int = 256,
        value_range: tuple[float, float] | None = None,
        prior_pairs: float = PRIOR_PAIRS,
        floor_ratio: float = FLOOR_RATIO,
        metadata: dict[str, Any] | None = None,
    ) -> HybridNoiseModel:
        """Histogram of the pairs blended with `parametric` (already fitted to the same pairs)."""
        counts, value_range, signal_range = binned_pairs(signal, observation, bins, value_range)
        support = counts.sum(1)
        table = BinnedTable(counts, value_range)
        q = bin_probabilities(parametric, table)
        blend = (counts + prior_pairs * q) / (support + prior_pairs)[:, None]
        density = ((1 - floor_ratio) * blend + floor_ratio * q) / table.width
        # Far tails where even the parametric probability underflows get the histogram's floor.
        density = density.clamp(min=DENSITY_FLOOR)
        metadata = {"prior_pairs": prior_pairs, "floor_ratio": floor_ratio, **(metadata or {})}
        return cls(density, value_range, support, signal_range, metadata, parametric=parametric)

    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        observation, signal = torch.broadcast_tensors(observation.float(), signal.float())
        log_density = self.table.interpolated(observation, signal).log()
        outside = ~(
            self.table.observation_inside(observation)
            & (signal >= self.table.low)
            & (signal < self.table.high)
        )
        if torch.compiler.is_compiling():  # one graph, static shapes: no break, no recompiling
            parametric = self.parametric.log_likelihood(observation, signal)
            return torch.where(outside, parametric, log_density)
        if not bool(outside.any()):  # the usual case: no parametric evaluation at all
            return log_density
        # Only the (few) pairs outside the table pay for the costlier parametric model.
        parametric = self.parametric.log_likelihood(observation[outside], signal[outside])
        return log_density.index_put((outside,), parametric)

    def to(self, device: torch.device | str) -> HybridNoiseModel:
        super().to(device)
        self.parametric.to(device)
        return self

    def state(self) -> dict[str, Any]:
        return {**super().state(), "parametric": self.parametric.state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HybridNoiseModel:
        parametric = noise_model_from_state(state["parametric"])
        return cls(*table_arguments(state), parametric=parametric)
