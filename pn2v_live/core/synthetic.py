"""Synthetic microscope data: fluorescent structures and a Poisson–Gaussian camera with known
parameters, for tests, demos and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Camera:
    """x = offset + gain · Poisson((s − offset) / gain) + N(0, read_noise²), in ADU.

    gain in ADU per photoelectron, offset and read_noise in ADU; so E[x] = s and
    Var[x] = gain · (s − offset) + read_noise².
    """

    gain: float = 2.0
    offset: float = 100.0
    read_noise: float = 3.0
    dtype: str = "uint16"

    def expose(self, signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One noisy frame of the clean `signal` (ADU), clipped and rounded to `dtype`."""
        electrons = rng.poisson(np.clip(signal - self.offset, 0, None) / self.gain)
        noisy = self.offset + self.gain * electrons + rng.normal(0, self.read_noise, signal.shape)
        info = np.iinfo(self.dtype)
        return np.clip(np.rint(noisy), info.min, info.max).astype(self.dtype)


def scene(
    shape: tuple[int, int], rng: np.random.Generator, background: float, peak: float
) -> np.ndarray:
    """A clean float32 (Y, X) image: blurred nuclei-like blobs and thin filaments.

    Values span [background, peak] ADU.
    """
    height, width = shape
    image = np.zeros(shape, np.float64)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(max(3, height * width // 3000)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(3, 12, size=2)
        image += rng.uniform(0.3, 1.0) * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
    for _ in range(max(2, height * width // 6000)):
        y, x = rng.uniform(0, height), rng.uniform(0, width)
        angle, brightness = rng.uniform(0, np.pi), rng.uniform(0.4, 1.0)
        for _ in range(int(rng.uniform(20, 3 * max(shape)))):
            angle += rng.normal(0, 0.08)
            y, x = y + np.sin(angle), x + np.cos(angle)
            if 0 <= y < height and 0 <= x < width:
                image[int(y), int(x)] = max(image[int(y), int(x)], brightness)
    image = ndimage.gaussian_filter(image, 1.2)
    image /= max(image.max(), 1e-12)
    return (background + (peak - background) * image).astype(np.float32)


def acquisition(
    camera: Camera,
    frames: int,
    shape: tuple[int, int] = (128, 128),
    background: float | None = None,
    peak: float | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """`frames` noisy frames (T, Y, X) of one static synthetic scene, and the clean scene."""
    rng = np.random.default_rng(seed)
    background = camera.offset + 10 * camera.gain if background is None else background
    peak = camera.offset + 400 * camera.gain if peak is None else peak
    clean = scene(shape, rng, background, peak)
    return np.stack([camera.expose(clean, rng) for _ in range(frames)]), clean
