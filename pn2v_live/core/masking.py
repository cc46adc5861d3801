"""Noise2Void masking.

About `fraction` of each patch's pixels, one per cell of a stratified grid, are replaced by a
random neighbour from the (2·radius+1)² window around them, never by themselves.
"""

from __future__ import annotations

import math

import torch

DEFAULT_FRACTION = 1 / 32


def stratified_coordinates(
    batch: int, height: int, width: int, fraction: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random pixel per grid cell: (b, y, x) index vectors, about fraction·H·W per patch."""
    rows = max(1, round(height * math.sqrt(fraction)))
    cols = max(1, round(height * width * fraction / rows))
    y_edges = torch.linspace(0, height, rows + 1)
    x_edges = torch.linspace(0, width, cols + 1)
    y0, x0 = torch.meshgrid(y_edges[:-1], x_edges[:-1], indexing="ij")
    dy, dx = torch.meshgrid(y_edges.diff(), x_edges.diff(), indexing="ij")
    shape = (batch, rows, cols)
    y = (y0 + torch.rand(shape, generator=generator) * dy).long().clamp_(max=height - 1)
    x = (x0 + torch.rand(shape, generator=generator) * dx).long().clamp_(max=width - 1)
    b = torch.arange(batch).view(batch, 1, 1).expand(shape)
    return b.flatten(), y.flatten(), x.flatten()


def _neighbour(index: torch.Tensor, offset: torch.Tensor, size: int) -> torch.Tensor:
    """index + offset, or index − offset where that leaves [0, size): a non-zero offset stays
    non-zero, so a pixel is never replaced by itself."""
    moved = index + offset
    return torch.where((moved < 0) | (moved >= size), index - offset, moved)


def n2v_mask(
    patches: torch.Tensor,
    fraction: float = DEFAULT_FRACTION,
    radius: int = 2,
    generator: torch.Generator | None = None,
    channel: int = 0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Mask channel `channel` of (B, C, H, W) patches (frame t of a temporal window; the other
    frames stay as they are); returns the masked copy and the (b, y, x) masked indices, on the
    patches' device (drawn from `generator` on the CPU, moved once)."""
    batch, _, height, width = patches.shape
    if min(height, width) <= 2 * radius:
        raise ValueError(f"patches of {height}×{width} are too small for a radius-{radius} window")
    b, y, x = stratified_coordinates(batch, height, width, fraction, generator)
    span = 2 * radius + 1
    # Offsets drawn from the window without its centre: 0 .. span²-2, skipping the centre index.
    pick = torch.randint(0, span * span - 1, (b.numel(),), generator=generator)
    pick = pick + (pick >= (span * span) // 2).long()
    ny = _neighbour(y, pick // span - radius, height)
    nx = _neighbour(x, pick % span - radius, width)
    b, y, x, ny, nx = (i.to(patches.device) for i in (b, y, x, ny, nx))
    masked = patches.clone()
    masked[b, channel, y, x] = patches[b, channel, ny, nx]
    return masked, (b, y, x)
