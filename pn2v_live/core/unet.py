"""The U-Net of the paper: depth 3, 64/128/256 features, 3×3 convs + ReLU, transposed convs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

INFERENCE_MEMORY_FORMAT = torch.channels_last  # the fastest layout for denoising on CPU and GPU


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """`in_channels` frames (1, or a temporal window) → `out_channels` (K prior samples for
    PN2V, 1 for N2V/supervised).

    `body` gives the last feature map (B, features, H, W); `head` is a 1×1 conv on it, kept
    separate so training and inference can apply it only where needed. H and W must be
    multiples of `size_multiple` (2 ** (depth - 1)). Parameters and activations are laid out in
    `memory_format`: `INFERENCE_MEMORY_FORMAT` unless `use_memory_format` says otherwise.
    """

    def __init__(self, out_channels: int, depth: int = 3, features: int = 64, in_channels: int = 1):
        super().__init__()
        widths = [features * 2**level for level in range(depth)]
        self.depth, self.features = depth, features
        self.size_multiple = 2 ** (depth - 1)
        self.down = nn.ModuleList(
            _conv_block(in_channels if level == 0 else widths[level - 1], widths[level])
            for level in range(depth)
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            for level in range(depth - 1)
        )
        self.merge = nn.ModuleList(
            _conv_block(2 * widths[level], widths[level]) for level in range(depth - 1)
        )
        self.head = nn.Conv2d(features, out_channels, 1)
        self.memory_format = torch.contiguous_format
        self.use_memory_format(INFERENCE_MEMORY_FORMAT)

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Lay the parameters, and from now on the activations, out in `memory_format`."""
        if memory_format != self.memory_format:
            self.to(memory_format=memory_format)
            self.memory_format = memory_format

    @property
    def out_channels(self) -> int:
        return self.head.out_channels

    @property
    def in_channels(self) -> int:
        return self.down[0][0].in_channels

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) normalised input → (B, features, H, W) features (in
        `memory_format`)."""
        x = x.contiguous(memory_format=self.memory_format)
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottom level is x itself
        for level in reversed(range(self.depth - 1)):
            # Only the concatenation stays alive into the merge: a full-resolution map less.
            x = torch.cat([self.up[level](x), skips.pop()], dim=1)
            x = self.merge[level](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) → (B, out_channels, H, W); materialises every output (use for
        K = 1)."""
        return self.head(self.body(x))
