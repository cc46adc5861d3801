"""One frame's MMSE denoising as the inference stage runs it: the dask task, and the warm-up
while the stage waits for the first model.

Warm-up: the first frame a model denoises would otherwise pay for compiling the MMSE kernel
(torch.compile: seconds on a CPU, more while the trainer shares its cores), just when the
backlog of frames stored before that model is largest. Denoising one stored frame with an
untrained network of the trainer's architecture compiles it before: the kernel depends on the
noise model, K and the feature count, not on the weights, so the trained model reuses it (and
the compiler's memory is taken in the daemon's first seconds).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pn2v_live.core.inference import denoise
from pn2v_live.core.model import Denoiser, new_denoiser
from pn2v_live.core.noise.base import NoiseModel


def denoise_frame(
    denoiser: Denoiser,
    noise_model: NoiseModel,
    raw: np.ndarray,
    tile: int | None,
    compiled: bool = False,
    bf16: bool | None = None,
    read_variance: np.ndarray | None = None,
) -> np.ndarray:
    """The dask task: MMSE estimate (float32, Y × X) of one raw frame (Y, X) in ADU, or of the
    frame at the centre of a (channels, Y, X) temporal window (`core.context.window`); with
    camera maps, equalised frames and their (Y, X) `read_variance`."""
    return denoise(
        denoiser,
        raw,
        noise_model,
        tile=tile,
        compiled=compiled,
        bf16=bf16,
        read_variance=read_variance,
    )["denoised"]


def warm_up(
    raw: np.ndarray,
    noise_model: NoiseModel,
    k: int,
    device: torch.device,
    tile: int | None,
    compiled: bool,
    bf16: bool | None,
    read_variance: np.ndarray | None = None,
) -> float:
    """Denoise `raw` ((1, Y, X) or (Y, X) ADU, as `denoise_frame` takes it) once with an
    untrained PN2V network of K outputs and the trainer's architecture (`new_denoiser`'s
    defaults), the result discarded; returns the seconds it took."""
    stand_in = new_denoiser("pn2v", float(np.nanmean(raw)), float(np.nanstd(raw)), k=k)
    stand_in.net.to(device)
    started = time.monotonic()
    denoise_frame(stand_in, noise_model, raw, tile, compiled, bf16, read_variance)
    return time.monotonic() - started
