"""The paper's histogram noise model: a 2-D histogram of (signal, observation) pairs."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from pn2v_live.core.noise.base import NoiseModel, as_pairs, is_integer_valued

# Density (per ADU) of empty bins and of observations outside the table, so log never sees 0.
DENSITY_FLOOR = 1e-10


class BinnedTable:
    """A bins × bins density table over one common [low, high) range for signal and observation.

    Row r holds p(x | s = centre of signal bin r) as a density per ADU; `log_likelihood`
    interpolates linearly between rows along the signal axis (clamped at the first/last row
    centre) and picks the observation's column.
    """

    def __init__(self, density: torch.Tensor, value_range: tuple[float, float]):
        self.density = density.float().contiguous()
        self.bins = density.shape[0]
        self.low, self.high = float(value_range[0]), float(value_range[1])
        self.width = (self.high - self.low) / self.bins

    def row_centres(self) -> torch.Tensor:
        """Signal (ADU) at the centre of every row, shape (bins,)."""
        return self.low + self.width * (torch.arange(self.bins, dtype=torch.float32) + 0.5)

    def observation_inside(self, observation: torch.Tensor) -> torch.Tensor:
        """Boolean mask of observations that fall in a table column."""
        return (observation >= self.low) & (observation < self.high)

    def interpolated(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """Table density at (observation column, signal), linear in signal between row centres."""
        n = self.bins
        # NaN would become an index far outside the table (IndexError, or a device assert on a
        # GPU): its column and row are the first; a NaN signal still gives NaN through `fraction`.
        observation = torch.nan_to_num(observation, nan=self.low)
        column = ((observation - self.low) / self.width).floor().clamp(0, n - 1).long()
        position = ((signal - self.low) / self.width - 0.5).clamp(0, n - 1)
        row = torch.nan_to_num(position.detach(), nan=0.0).floor().clamp(max=n - 2).long()
        fraction = position - row
        flat = row * n + column
        table = self.density.view(-1)
        below = table[flat]
        above = table[flat + n]
        return below + fraction * (above - below)


def finite_pairs(
    signal: torch.Tensor, observation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (signal, observation) pairs where both are finite (NaN marks a missing frame or pixel);
    ValueError when none are (a histogram of nothing has no range)."""
    finite = torch.isfinite(signal) & torch.isfinite(observation)
    if not bool(finite.all()):
        signal, observation = signal[finite], observation[finite]
    if signal.numel() == 0:
        raise ValueError(
            "no finite (signal, observation) pairs to fit a noise model on: the calibration "
            "data is empty or all NaN/infinite"
        )
    return signal, observation


def pair_counts(
    signal: torch.Tensor, observation: torch.Tensor, bins: int, value_range: tuple[float, float]
) -> torch.Tensor:
    """2-D histogram (bins, bins) of pairs: rows index signal, columns observation; out-of-range
    pairs are dropped."""
    low, high = value_range
    width = (high - low) / bins
    inside = (signal >= low) & (signal < high) & (observation >= low) & (observation < high)
    row = ((signal[inside] - low) / width).long().clamp(0, bins - 1)
    column = ((observation[inside] - low) / width).long().clamp(0, bins - 1)
    counts = torch.bincount(row * bins + column, minlength=bins * bins)
    return counts.view(bins, bins).float()


def common_range(
    signal: torch.Tensor, observation: torch.Tensor, bins: int = 256
) -> tuple[float, float]:
    """One [low, high) range covering signal and observations.

    For whole-number camera data the bins are a whole number of ADU wide and centred on whole
    numbers, so every bin holds the same count of possible values (the density per ADU is not
    distorted by binning) and dequantised values stay in their bin.
    """
    low = float(torch.minimum(signal.min(), observation.min()))
    high = float(torch.maximum(signal.max(), observation.max()))
    if is_integer_valued(observation):
        low = math.floor(low) - 0.5
        width = math.ceil((high - low) / bins)
        return low, low + bins * width
    return low, high + 1e-6 * max(1.0, high - low)


class HistogramNoiseModel(NoiseModel):
    """256 × 256 histogram of (signal, observation), rows normalised (Krull et al., PN2V).

    Outside the table the model clamps: signals beyond the first/last row centre use that row,
    observations outside [low, high) get `DENSITY_FLOOR`. Empty rows are flat at the floor, which
    is why `HybridNoiseModel` exists.
    """

    kind: ClassVar[str] = "histogram"

    def __init__(
        self,
        density: torch.Tensor,
        value_range: tuple[float, float],
        support: torch.Tensor,
        signal_range: tuple[float, float],
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(signal_range, metadata)
        self.table = BinnedTable(density, value_range)
        self.support = support.float()

    @classmethod
    def fit(
        cls,
        signal: np.ndarray | torch.Tensor,
        observation: np.ndarray | torch.Tensor,
        *,
        value_range: tuple[float, float] | None = None,
        bins: int = 256,
        metadata: dict[str, Any] | None = None,
    ) -> HistogramNoiseModel:
        """Histogram of pairs; `signal` broadcasts against `observation` (e.g. (Y,X) vs (T,Y,X))."""
        counts, value_range, signal_range = binned_pairs(signal, observation, bins, value_range)
        support = counts.sum(1)
        width = (value_range[1] - value_range[0]) / bins
        density = counts / support.clamp(min=1)[:, None] / width
        return cls(density.clamp(min=DENSITY_FLOOR), value_range, support, signal_range, metadata)

    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        observation, signal = observation.float(), signal.float()
        density = self.table.interpolated(observation, signal)
        inside = self.table.observation_inside(observation)
        return torch.where(inside, density, DENSITY_FLOOR).log()

    def to(self, device: torch.device | str) -> HistogramNoiseModel:
        self.table.density = self.table.density.to(device)
        return self

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "density": self.table.density.cpu(),
            "value_range": [self.table.low, self.table.high],
            "support": self.support.cpu(),
            "signal_range": list(self.signal_range),
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HistogramNoiseModel:
        return cls(*table_arguments(state))


def binned_pairs(
    signal: np.ndarray | torch.Tensor,
    observation: np.ndarray | torch.Tensor,
    bins: int,
    value_range: tuple[float, float] | None,
) -> tuple[torch.Tensor, tuple[float, float], tuple[float, float]]:
    """The finite (signal, observation) pairs (`signal` broadcasting against `observation`)
    counted into a (bins, bins) table over `value_range` (None: `common_range` of the pairs):
    the counts, the value range, and the pairs' signal range (ADU)."""
    signal, observation = finite_pairs(*as_pairs(signal, observation))
    value_range = value_range or common_range(signal, observation, bins)
    counts = pair_counts(signal, observation, bins, value_range)
    return counts, value_range, (float(signal.min()), float(signal.max()))


def table_arguments(state: dict[str, Any]) -> tuple:
    """(density, value_range, support, signal_range, metadata) of a saved histogram table."""
    return (
        state["density"],
        tuple(state["value_range"]),
        state["support"],
        tuple(state["signal_range"]),
        state["metadata"],
    )
