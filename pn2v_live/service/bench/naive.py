"""The straightforward formulation of PN2V, kept as the baseline the fused core is measured
and tested against: every K×H×W sample materialised, the head evaluated on every pixel."""

from __future__ import annotations

import numpy as np
import torch

from pn2v_live.core.losses import pn2v_loss
from pn2v_live.core.masking import n2v_mask
from pn2v_live.core.model import Denoiser
from pn2v_live.core.noise.base import NoiseModel


@torch.inference_mode()
def naive_mmse(
    denoiser: Denoiser,
    image: np.ndarray,
    noise_model: NoiseModel,
    read_variance: np.ndarray | None = None,
) -> np.ndarray:
    """Eq. 10 on the whole (Y, X) frame at once: (K, Y, X) samples, likelihoods and weights;
    `read_variance` (Y, X): the pixels' own read-noise variance with camera maps."""
    frame = torch.as_tensor(np.asarray(image, dtype=np.float32)).to(denoiser.device)
    net = denoiser.net.eval()
    samples = net(denoiser.normalise(frame)[None, None])[0] * denoiser.std + denoiser.mean
    pixels = None if read_variance is None else torch.as_tensor(read_variance)[None]
    log_p = noise_model.pixel_log_likelihood(frame[None], samples, pixels)
    return (torch.softmax(log_p, dim=0) * samples).sum(dim=0).cpu().numpy()


def naive_pn2v_loss(
    denoiser: Denoiser,
    batch: torch.Tensor,
    noise_model: NoiseModel,
    fraction: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. 7 with the K-sample head evaluated on every pixel of the (B, 1, H, W) patches."""
    masked, (b, y, x) = n2v_mask(batch, fraction, generator=generator)
    samples = denoiser.net(denoiser.normalise(masked)) * denoiser.std + denoiser.mean
    return pn2v_loss(samples[b, :, y, x], batch[b, 0, y, x], noise_model)
