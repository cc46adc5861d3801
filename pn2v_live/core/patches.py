"""Patches for training: random square patches of frames, and the frames split into training
and validation sets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pn2v_live.core.context import Windows


def sample_patches(
    frames: Sequence[np.ndarray],
    n: int,
    size: int,
    rng: np.random.Generator,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """`n` random square patches (n, C, size, size) float32, randomly rotated by 90° and flipped.

    `frames` are (Y, X) or (C, Y, X) arrays (C aligned channels: a temporal window, with the
    ground truth last for supervised training), e.g. `Windows`; a frame is drawn with
    probability proportional to `weights` (uniform when None).
    """
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    patches = np.empty((n, *_channels_first(frames[0]).shape[:1], size, size), np.float32)
    for i, index in enumerate(rng.choice(len(frames), size=n, p=p)):
        frame = _channels_first(frames[index])
        height, width = frame.shape[1:]
        if height < size or width < size:
            raise ValueError(f"patch size {size} exceeds frame size {height}×{width}")
        y = rng.integers(0, height - size + 1)
        x = rng.integers(0, width - size + 1)
        patch = frame[:, y : y + size, x : x + size]
        patch = np.rot90(patch, k=int(rng.integers(4)), axes=(1, 2))
        patches[i] = patch[:, :, ::-1] if rng.integers(2) else patch
    return torch.from_numpy(patches)


def _channels_first(frame: np.ndarray) -> np.ndarray:
    return frame[np.newaxis] if frame.ndim == 2 else frame


def split_frames(
    frames: Sequence[np.ndarray], val_fraction: float, patch_size: int, rng: np.random.Generator
) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray]]:
    """Hold back about `val_fraction` of the frames (≥ 1 when there are ≥ 2 frames).

    With a single frame, a bottom strip of rows (val_fraction of the height, at least one
    patch high) is held back instead.
    """
    if len(frames) >= 2:
        order = rng.permutation(len(frames))
        n_val = max(1, round(val_fraction * len(frames)))
        return _pick(frames, order[n_val:]), _pick(frames, order[:n_val])
    frame = frames[0]
    height = frame.shape[-2]
    strip = max(round(val_fraction * height), patch_size)
    if height - strip < patch_size:
        raise ValueError(
            f"one {height}-row frame cannot hold {patch_size}-pixel training and validation "
            "patches: give more frames or a smaller patch size"
        )
    return [frame[..., : height - strip, :]], [frame[..., height - strip :, :]]


def _pick(frames: Sequence[np.ndarray], positions: Sequence[int]) -> Sequence[np.ndarray]:
    """The frames at `positions`; `Windows` stay lazy."""
    if isinstance(frames, Windows):
        return frames.subset(positions)
    return [frames[p] for p in positions]
