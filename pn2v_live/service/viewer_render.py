"""Turn one frame (Y, X) in camera units (ADU) into a small 8-bit image for the web viewer.

Pure numpy + Pillow: contrast limits from percentiles, area-averaged downsampling to a maximum
side length, linear mapping of [lo, hi] to 0..255, PNG/JPEG/WebP encoding.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
PERCENTILE_SAMPLE = 1 << 18  # pixels used for auto-contrast percentiles (enough for 0.1 % tails)


def contrast_limits(frame: np.ndarray, low: float = 0.5, high: float = 99.8) -> tuple[float, float]:
    """The `low` and `high` percentiles (0..100) of a frame's finite pixels, hi > lo always."""
    values = frame.ravel()
    if values.size > PERCENTILE_SAMPLE:
        values = values[:: values.size // PERCENTILE_SAMPLE]
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    return lo, hi if hi > lo else lo + 1.0


def downsample(frame: np.ndarray, max_size: int) -> np.ndarray:
    """Area-averaged float32 copy whose longer side is at most `max_size` pixels (aspect kept)."""
    height, width = frame.shape
    scale = max_size / max(height, width)
    image = np.ascontiguousarray(frame, dtype=np.float32)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def to_uint8(frame: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto 0..255 (clipped, rounded); NaN becomes 0."""
    scaled = (frame.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.nan_to_num(np.clip(np.rint(scaled), 0, 255)).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    """Encode an 8-bit (Y, X) image as PNG, JPEG or WebP bytes."""
    buffer = io.BytesIO()
    pil_image = Image.fromarray(image)
    if fmt == "png":
        pil_image.save(buffer, format="PNG", compress_level=1)
    elif fmt in ("jpeg", "webp"):
        pil_image.save(buffer, format=fmt.upper(), quality=90)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use one of {', '.join(FORMATS)}")
    return buffer.getvalue()


def render(frame: np.ndarray, lo: float, hi: float, max_size: int, fmt: str = "png") -> bytes:
    """Downsample, apply the contrast window [lo, hi] and encode: the bytes the browser shows."""
    return encode(to_uint8(downsample(frame, max_size), lo, hi), fmt)
