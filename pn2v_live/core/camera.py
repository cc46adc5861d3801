"""sCMOS camera maps: every pixel's own offset, gain and read-noise variance.

A pixel i reads x_i = offset_i + gain_i · n_i + r_i, with n_i ~ Poisson(λ_i) photo-electrons and
r_i ~ Normal(0, variance_i). Frames are *equalised* to a reference pixel (the maps' median offset
o and gain g),

    y_i = o + g · (x_i − offset_i) / gain_i,

so that E[y_i] = o + g · λ_i = s_i whatever the pixel (no fixed pattern) and
Var[y_i] = g · (s_i − o) + w_i, with w_i = variance_i · (g / gain_i)² the pixel's read-noise
variance in reference ADU². The signal s is then in the ADU of a typical pixel, as everywhere
else in pn2v-live.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HOT_FACTOR = 5.0  # a pixel whose read-noise variance exceeds this × the median is "hot"


@dataclass
class CameraMaps:
    """Per-pixel maps (H, W) float32 of one sensor region.

    offset in ADU, gain in ADU per photo-electron (> 0), variance (read noise²) in ADU².
    `origin` is the sensor position (row, column) of the maps' pixel [0, 0]. `reference` is the
    (offset o ADU, gain g ADU/e⁻) frames are equalised to; None: the maps' medians (a crop made
    by `region` keeps those of the whole maps). `metadata` holds plain values (camera, date,
    frames used, ...).
    """

    offset: np.ndarray
    gain: np.ndarray
    variance: np.ndarray
    origin: tuple[int, int] = (0, 0)
    reference: tuple[float, float] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offset, self.gain, self.variance = (
            np.asarray(m, dtype=np.float32) for m in (self.offset, self.gain, self.variance)
        )
        shapes = {m.shape for m in (self.offset, self.gain, self.variance)}
        if len(shapes) != 1 or len(self.offset.shape) != 2:
            raise ValueError(f"camera maps must be three 2-D maps of one shape, not {shapes}")
        for name in ("offset", "gain", "variance"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise ValueError(f"the {name} map holds NaN or infinite values")
        if not np.all(self.gain > 0):
            raise ValueError(f"the gain map has {int(np.sum(self.gain <= 0))} pixel(s) ≤ 0")
        if not np.all(self.variance >= 0):
            raise ValueError("the variance map has negative values")
        self.origin = (int(self.origin[0]), int(self.origin[1]))
        if self.reference is None:
            self.reference = (float(np.median(self.offset)), float(np.median(self.gain)))
        self.reference = (float(self.reference[0]), float(self.reference[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return self.offset.shape

    def content_id(self) -> str:
        """A short identifier (16 hex digits of a SHA-256) of what the maps do to frames: the three
        maps, their origin and reference, not their metadata (dates, names)."""
        digest = hashlib.sha256()
        for values in (self.offset, self.gain, self.variance):
            digest.update(np.ascontiguousarray(values, np.float32).tobytes())
            digest.update(repr(values.shape).encode())
        digest.update(repr((self.origin, self.reference)).encode())
        return digest.hexdigest()[:16]

    def pixel_variance(self) -> np.ndarray:
        """w_i: each pixel's read-noise variance in reference ADU² (H, W) float32."""
        return (self.variance * (self.reference[1] / self.gain) ** 2).astype(np.float32)

    def hot_pixels(self, factor: float = HOT_FACTOR) -> np.ndarray:
        """(H, W) bool: pixels whose read-noise variance exceeds `factor` × the median."""
        return self.variance > factor * float(np.median(self.variance))

    def region(self, origin: tuple[int, int], shape: tuple[int, int]) -> CameraMaps:
        """The maps of a frame `shape` (rows, columns) whose pixel [0, 0] sits at sensor position
        `origin`; ValueError when the frame reaches beyond these maps. The crop keeps the
        `reference` of these maps, so every crop equalises alike."""
        top, left = origin[0] - self.origin[0], origin[1] - self.origin[1]
        height, width = shape
        if top < 0 or left < 0 or top + height > self.shape[0] or left + width > self.shape[1]:
            raise ValueError(
                f"a {height}×{width} frame at sensor position (row {origin[0]}, column "
                f"{origin[1]}) lies outside the camera maps, which cover rows "
                f"{self.origin[0]}–{self.origin[0] + self.shape[0] - 1} and columns "
                f"{self.origin[1]}–{self.origin[1] + self.shape[1] - 1}; give the frame's "
                "position on the sensor, or maps of the whole sensor"
            )
        inside = (slice(top, top + height), slice(left, left + width))
        return CameraMaps(
            self.offset[inside],
            self.gain[inside],
            self.variance[inside],
            (int(origin[0]), int(origin[1])),
            self.reference,
            dict(self.metadata),
        )

    def equalise(self, frames: np.ndarray) -> np.ndarray:
        """Raw frames (…, H, W) in ADU → equalised float32 frames in reference ADU (module
        docstring); NaN (a missing frame) stays NaN."""
        offset, gain = self.reference
        return (offset + gain * (np.asarray(frames, np.float32) - self.offset) / self.gain).astype(
            np.float32
        )
