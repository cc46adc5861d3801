"""Per-pixel noise model of an sCMOS camera: a noise model of the typical pixel, adapted to each
pixel's own read-noise variance through the camera maps (`core.camera`).

Frames are equalised first (`CameraMaps.equalise`): pixel i's value y_i then has mean s and
variance g·max(s − o, 0) + w_i (o, g the reference offset and gain, w_i the pixel's read-noise
variance in reference ADU²). The `base` model describes a pixel with the median w̄; pixel i gets
it rescaled about s by r_i(s) = √((g·max(s − o, 0) + w_i) / (g·max(s − o, 0) + w̄)):

    log p_i(y | s) = log p_base(s + (y − s) / r_i(s) | s) − log r_i(s)

With the maps' own Poisson–Gaussian as `base` (`from_maps`) this is exactly
Normal(y; s, g·max(s − o, 0) + w_i); a base calibrated on equalised frames keeps its shape
(skew, histogram) and only its width changes per pixel.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from pn2v_live.core.camera import CameraMaps
from pn2v_live.core.noise.base import NoiseModel, noise_model_from_state
from pn2v_live.core.noise.poisson_gaussian import PoissonGaussianNoiseModel

# Added to both variances of r_i(s) (ADU²): with maps that hold no read noise (map files without a
# variance map: every w_i = w̄ = 0) a signal at or below the offset gives r_i = 1, not 0 / 0.
TINY_VARIANCE = 1e-6


class CameraNoiseModel(NoiseModel):
    """`base` (ADU of the reference pixel) made per-pixel by `maps`; see the module docstring."""

    kind: ClassVar[str] = "camera-maps"

    def __init__(self, base: NoiseModel, maps: CameraMaps, metadata: dict[str, Any] | None = None):
        super().__init__(base.signal_range, metadata)
        self.base, self.maps = base, maps
        self.typical_variance = float(np.median(maps.pixel_variance()))

    @classmethod
    def from_maps(
        cls,
        maps: CameraMaps,
        signal_range: tuple[float, float],
        metadata: dict[str, Any] | None = None,
    ) -> CameraNoiseModel:
        """The maps alone: base = Poisson–Gaussian of the reference pixel (gain g, offset o, read
        noise √w̄); `signal_range` (reference ADU) is what the calibration covered."""
        offset, gain = maps.reference
        read_noise = float(np.sqrt(np.median(maps.pixel_variance())))
        base = PoissonGaussianNoiseModel(gain, offset, read_noise, signal_range)
        return cls(base, maps, metadata)

    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """The typical pixel's log-likelihood (the base model)."""
        return self.base.log_likelihood(observation, signal)

    def variance_log_likelihood(
        self, observation: torch.Tensor, signal: torch.Tensor, read_variance: torch.Tensor
    ) -> torch.Tensor:
        """The base model's log-likelihood of the observation rescaled from the pixel's noise
        (`read_variance`, reference ADU²) to the typical pixel's."""
        offset, gain = self.maps.reference
        shot = gain * (signal.float() - offset).clamp(min=0) + TINY_VARIANCE
        log_ratio = 0.5 * (
            torch.log(shot + read_variance) - torch.log(shot + self.typical_variance)
        )
        rescaled = signal + (observation - signal) * torch.exp(-log_ratio)
        return self.base.log_likelihood(rescaled, signal) - log_ratio

    def camera_inputs(
        self, frames: np.ndarray, origin: tuple[int, int] = (0, 0)
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw frames (…, H, W) of the sensor region at `origin` → equalised frames and the
        region's read-noise variance map w (H, W) in reference ADU²; ValueError when the frames
        reach beyond the maps."""
        region = self.maps.region(origin, np.shape(frames)[-2:])
        return region.equalise(frames), region.pixel_variance()

    def state(self) -> dict[str, Any]:
        m = self.maps
        return {
            "kind": self.kind,
            "base": self.base.state(),
            "maps": {
                "offset": torch.from_numpy(m.offset),
                "gain": torch.from_numpy(m.gain),
                "variance": torch.from_numpy(m.variance),
                "origin": list(m.origin),
                "reference": list(m.reference),
                "metadata": m.metadata,
            },
            "signal_range": list(self.signal_range),
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CameraNoiseModel:
        m = state["maps"]
        maps = CameraMaps(
            m["offset"].numpy(),
            m["gain"].numpy(),
            m["variance"].numpy(),
            tuple(m["origin"]),
            tuple(m["reference"]),
            m["metadata"],
        )
        return cls(noise_model_from_state(state["base"]), maps, state["metadata"])
