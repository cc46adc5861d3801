"""A trained denoiser: the U-Net plus what is needed to apply it (mode, K, normalisation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from pn2v_live.core.context import SPATIAL, Context
from pn2v_live.core.unet import UNet

Mode = Literal["pn2v", "n2v", "supervised"]
MODES: tuple[str, ...] = ("pn2v", "n2v", "supervised")


@dataclass
class Denoiser:
    """`net` maps (x - mean) / std to outputs in the same normalised units.

    For "pn2v" the K outputs are samples of the prior p(s | neighbourhood); for "n2v" and
    "supervised" the single output is the estimate itself. The network's input is the frames of
    `context` around the frame denoised (one channel each). A `residual` model adds to its
    outputs the mean of the other frames of its window (`prior_offset`), so it starts from
    temporal averaging and learns what the frames' neighbourhoods add. `history` holds the
    training record.
    """

    net: UNet
    mode: Mode
    mean: float
    std: float
    history: list[dict[str, Any]] = field(default_factory=list)
    context: Context = SPATIAL
    residual: bool = False

    @property
    def k(self) -> int:
        return self.net.out_channels

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """ADU → network input units; a missing frame (NaN) becomes 0, the data mean."""
        return torch.nan_to_num((x - self.mean) / self.std, nan=0.0)

    def prior_offset(self, window: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) raw ADU windows (NaN where a frame is missing) → (B, H, W) ADU added to
        every output: for a `residual` model the mean of the frames other than t that are
        present (and `seen`: (B, C) 0/1, the frames each window shows), minus the data mean;
        0 where no other frame is, and for every other model."""
        offset = window.new_zeros(window.shape[0], *window.shape[2:])
        if not self.residual:
            return offset
        present = torch.isfinite(window)
        present[:, self.context.before] = False
        if seen is not None:
            present &= seen.bool()[:, :, None, None]
        total = torch.where(present, window - self.mean, 0.0).sum(dim=1)
        return total / present.sum(dim=1).clamp(min=1)

    def body_in_bf16(self, bf16: bool | None = None) -> bool:
        """Whether the U-Net body runs in bfloat16: `bf16`, or where None, whether the device
        computes it natively (see `native_bf16`)."""
        return native_bf16(self.device) if bf16 is None else bf16

    def body_autocast(self, bf16: bool | None = None) -> torch.autocast:
        """Context for running the U-Net body in bfloat16 or float32 (see `body_in_bf16`)."""
        enabled = self.body_in_bf16(bf16)
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def head_in_adu(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 1×1 head folded with de-normalisation: features (…, F) @ W.T + b → ADU, W (K, F)."""
        weight = self.net.head.weight.flatten(1) * self.std
        bias = self.net.head.bias * self.std + self.mean
        return weight, bias


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA, or a CPU with AMX or AVX512-BF16
    (there oneDNN runs the U-Net body several times faster than in float32; docs/benchmarks.md).
    Elsewhere bfloat16 is emulated and slower, so the body stays float32."""
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


PRECISIONS = {"auto": None, "float32": False, "bfloat16": True}  # name → `bf16` argument


def new_denoiser(
    mode: Mode,
    mean: float,
    std: float,
    k: int = 800,
    depth: int = 3,
    features: int = 64,
    context: Context = SPATIAL,
    residual: bool | None = None,
) -> Denoiser:
    """A freshly initialised denoiser; K applies to "pn2v" only (the others have 1 output).
    `residual` None: every temporal window is residual (see `Denoiser`); False for files saved
    before residual windows."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    out_channels = k if mode == "pn2v" else 1
    net = UNet(out_channels, depth, features, in_channels=context.channels)
    residual = context.channels > 1 if residual is None else residual
    return Denoiser(
        net, mode, float(mean), float(max(std, 1e-6)), context=context, residual=residual
    )


def seeded_denoisers(
    mode: Mode, mean: float, std: float, k: int, seed: int, device: str | torch.device = "cpu"
) -> Callable[[Context], Denoiser]:
    """Makes fresh denoisers (`new_denoiser`) of one mode and normalisation on `device`, one per
    temporal context asked for, all from the initial weights of `seed`, so that runs differ only
    in what they are meant to."""

    def make(context: Context) -> Denoiser:
        torch.manual_seed(seed)
        denoiser = new_denoiser(mode, mean, std, k=k, context=context)
        denoiser.net.to(device)
        return denoiser

    return make


def normalisation_of(images: list[np.ndarray]) -> tuple[float, float]:
    """Mean and standard deviation (ADU) over all pixels of `images`."""
    values = np.concatenate([np.asarray(image, dtype=np.float32).ravel() for image in images])
    return float(values.mean()), float(values.std())
