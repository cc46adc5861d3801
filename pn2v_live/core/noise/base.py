"""The interface every noise model p(x | s) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch


class NoiseModel(ABC):
    """p(x | s): probability of observing x (camera units, ADU) when the true signal is s (ADU).

    `metadata` carries plain values for the file (camera, date, frames used, ranges, fit quality).
    `signal_range` is the (min, max) signal the calibration data covered.
    """

    kind: ClassVar[str]

    def __init__(self, signal_range: tuple[float, float], metadata: dict[str, Any] | None = None):
        self.signal_range = (float(signal_range[0]), float(signal_range[1]))
        self.metadata = dict(metadata or {})

    @abstractmethod
    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """log p(observation | signal), broadcasting the two tensors against each other.

        Both in ADU, float32, on the model's device; the result is finite everywhere and
        differentiable with respect to `signal`.
        """

    @abstractmethod
    def to(self, device: torch.device | str) -> NoiseModel:
        """Move the model's tensors to `device` (in place) and return self."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the model: tensors and plain values, incl. `kind`."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any]) -> NoiseModel:
        """Rebuild a model from `state()`."""

    def out_of_range_fraction(self, signal: torch.Tensor) -> float:
        """Fraction of `signal` values above the calibrated maximum."""
        return float((signal > self.signal_range[1]).float().mean())
