"""A synthetic sCMOS camera with known per-pixel maps (`core.camera`), including hot pixels:
scenes, dark series and flat-field series for tests, the demo and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pn2v_live.core.camera import CameraMaps
from pn2v_live.core.synthetic import scene


def scmos_maps(
    shape: tuple[int, int] = (64, 64),
    seed: int = 0,
    offset: float = 100.0,
    offset_spread: float = 3.0,
    gain: float = 2.0,
    gain_spread: float = 0.05,
    read_variance: float = 9.0,
    variance_spread: float = 0.3,
    hot_fraction: float = 0.005,
    hot_factor: float = 10.0,
) -> CameraMaps:
    """Known maps like an sCMOS camera's: offsets (ADU) normal about `offset` with std
    `offset_spread`; gains (ADU/e⁻) normal about `gain` with relative std `gain_spread`;
    read-noise variances (ADU²) log-normal about `read_variance` (log std `variance_spread`),
    and `hot_fraction` of the pixels, chosen at random, `hot_factor` times noisier."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(offset, offset_spread, shape)
    gains = gain * np.clip(rng.normal(1.0, gain_spread, shape), 0.5, 1.5)
    variances = read_variance * np.exp(rng.normal(0.0, variance_spread, shape))
    hot = rng.random(shape) < hot_fraction
    variances[hot] *= hot_factor
    return CameraMaps(offsets, gains, variances, metadata={"camera": "synthetic sCMOS"})


@dataclass(frozen=True)
class ScmosCamera:
    """x_i = offset_i + gain_i · Poisson(λ_i) + Normal(0, variance_i), rounded and clipped to
    `dtype`, for a signal s in reference ADU: λ_i = max(s_i − o, 0) / g (`CameraMaps.reference`)."""

    maps: CameraMaps
    dtype: str = "uint16"

    def expose(self, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One raw frame (H, W) of the clean `signal` (H, W, reference ADU, the maps' shape)."""
        offset, gain = self.maps.reference
        return self.expose_electrons(np.clip(signal - offset, 0, None) / gain, rng)

    def expose_electrons(self, electrons: np.ndarray | float, rng: np.random.Generator):
        """One raw frame (H, W) at `electrons` expected photo-electrons per pixel."""
        m = self.maps
        shot = rng.poisson(np.broadcast_to(electrons, m.shape))
        noisy = m.offset + m.gain * shot + rng.normal(0.0, 1.0, m.shape) * np.sqrt(m.variance)
        info = np.iinfo(self.dtype)
        return np.clip(np.rint(noisy), info.min, info.max).astype(self.dtype)

    def series(self, electrons: float, frames: int, seed: int = 0) -> np.ndarray:
        """(frames, H, W) raw frames of a uniform illumination: a dark series at 0 electrons, a
        flat-field series above."""
        rng = np.random.default_rng(seed)
        return np.stack([self.expose_electrons(electrons, rng) for _ in range(frames)])

    def acquisition(
        self, frames: int, peak_electrons: float = 200.0, background_electrons: float = 5.0,
        seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """`frames` raw frames (T, H, W) of one static synthetic scene, and the clean scene
        (H, W) in reference ADU."""
        rng = np.random.default_rng(seed)
        offset, gain = self.maps.reference
        clean = scene(
            self.maps.shape,
            rng,
            offset + gain * background_electrons,
            offset + gain * peak_electrons,
        )
        return np.stack([self.expose(clean, rng) for _ in range(frames)]), clean
