"""The interface every noise model p(x | s) implements, and rebuilding a model from its state."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

# Every concrete model registers its `kind` here so that `noise_model_from_state` can rebuild it.
MODEL_KINDS: dict[str, type[NoiseModel]] = {}


class NoiseModel(ABC):
    """p(x | s): probability of observing x (camera units, ADU) when the true signal is s (ADU).

    `metadata` carries plain values for the file (camera, date, frames used, ranges, fit quality).
    `signal_range` is the (min, max) signal the calibration data covered.
    """

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            MODEL_KINDS[cls.kind] = cls

    def __init__(self, signal_range: tuple[float, float], metadata: dict[str, Any] | None = None):
        self.signal_range = (float(signal_range[0]), float(signal_range[1]))
        self.metadata = dict(metadata or {})

    @abstractmethod
    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """log p(observation | signal) as a density per ADU, broadcasting the two tensors.

        Both in ADU, float32, on the model's device; the result is finite everywhere and
        differentiable with respect to `signal`.
        """

    def pixel_log_likelihood(
        self,
        observation: torch.Tensor,
        signal: torch.Tensor,
        read_variance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`log_likelihood` at pixels with their own read-noise variance `read_variance`
        (reference ADU², broadcasting like `observation`; see `core.camera`): a model with
        camera maps uses it (`variance_log_likelihood`), others ignore it."""
        if read_variance is None:
            return self.log_likelihood(observation, signal)
        return self.variance_log_likelihood(observation, signal, read_variance)

    def variance_log_likelihood(
        self, observation: torch.Tensor, signal: torch.Tensor, read_variance: torch.Tensor
    ) -> torch.Tensor:
        """`pixel_log_likelihood` where the pixels' read-noise variance is given: the plain
        `log_likelihood` for a model without camera maps."""
        return self.log_likelihood(observation, signal)

    def camera_inputs(
        self, frames: np.ndarray, origin: tuple[int, int] = (0, 0)
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw frames (…, H, W) in ADU as this model reads them, and their pixels' read-noise
        variance (H, W) for `pixel_log_likelihood`: float32 frames and None without camera maps
        (`origin`, the frames' sensor position, matters only with maps)."""
        return np.asarray(frames, dtype=np.float32), None

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the model: tensors and plain values, incl. `kind`."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any]) -> NoiseModel:
        """Rebuild a model from `state()`."""

    def to(self, device: torch.device | str) -> NoiseModel:
        """Move the model's tensors (and those of any model it wraps) to `device`; return self."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
            elif isinstance(value, NoiseModel):
                value.to(device)
        return self

    def out_of_range_fraction(self, signal: torch.Tensor) -> float:
        """Fraction of `signal` values above the calibrated maximum."""
        return float((signal > self.signal_range[1]).float().mean())

    def nll(
        self, signal: np.ndarray | torch.Tensor, observation: np.ndarray | torch.Tensor
    ) -> float:
        """Mean negative log-likelihood (nats per pixel) of observations given their signal.

        Whole-number observations are dequantised first (see `dequantised`), so that histogram
        and continuous models are compared on one scale.
        """
        signal, observation = as_pairs(signal, observation)
        observation = dequantised(observation)
        device = next((v.device for v in vars(self).values() if isinstance(v, torch.Tensor)), None)
        with torch.no_grad():
            values = [
                self.log_likelihood(x.to(device), s.to(device)).double().sum()
                for s, x in zip(signal.split(1 << 20), observation.split(1 << 20), strict=True)
            ]
        return -float(sum(values)) / signal.numel()


def noise_model_from_state(state: dict[str, Any]) -> NoiseModel:
    """Rebuild any registered noise model from its `state()` dict (dispatch on `kind`)."""
    kind = state.get("kind")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown noise model kind {kind!r}; known: {sorted(MODEL_KINDS)}")
    return MODEL_KINDS[kind].from_state(state)


def as_pairs(
    signal: np.ndarray | torch.Tensor, observation: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten (signal, observation) pairs into two float32 1-D CPU tensors of equal length.

    `signal` broadcasts against `observation`, e.g. a clean image (Y, X) against frames (T, Y, X).
    """
    signal = torch.as_tensor(np.asarray(signal, dtype=np.float32))
    observation = torch.as_tensor(np.asarray(observation, dtype=np.float32))
    signal, observation = torch.broadcast_tensors(signal, observation)
    return signal.reshape(-1), observation.reshape(-1)


def is_integer_valued(values: torch.Tensor) -> bool:
    """True when every value is a whole number (camera data before any scaling)."""
    return bool(torch.all(values == values.round()))


def dequantised(observation: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Whole-number observations plus uniform noise in [−0.5, 0.5) ADU (fixed seed); others as
    they are. A continuous density then cannot gain by peaking on the integers, and its NLL
    bounds the NLL of the camera's discrete values."""
    if not is_integer_valued(observation):
        return observation
    generator = torch.Generator().manual_seed(seed)
    return observation + torch.rand(observation.shape, generator=generator) - 0.5
