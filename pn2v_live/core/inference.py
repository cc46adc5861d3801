"""MMSE denoising (Eq. 10), tiled over the frame and chunked over pixels.

For PN2V the U-Net body runs once per tile; the K-sample head, the likelihood and the
posterior-weighted average then run over chunks of pixels, keeping only per-pixel sums, so
K×H×W is never allocated for a frame or a tile.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from pn2v_live.core.model import Denoiser
from pn2v_live.core.noise.base import NoiseModel

log = logging.getLogger(__name__)

OUTPUTS = ("denoised", "prior_mean", "posterior_std")
CHUNK_ELEMENTS = 2**21  # pixels × K per chunk: 8 MB per fp32 (chunk, K) buffer
ACTIVATION_BYTES_PER_PIXEL = 1400  # peak U-Net body memory per input pixel (fp32, measured)
TILE_MEMORY_BYTES = 256 * 2**20  # default activation budget per tile


def receptive_radius(depth: int) -> int:
    """Pixels on each side that influence an output pixel of the U-Net (3×3 convs, 2× pooling)."""
    down = sum(2 * 2**level for level in range(depth))
    up = sum(2 * 2**level for level in range(depth - 1))
    return down + up + 2 ** (depth - 1)


def auto_tile(memory_bytes: float, multiple: int) -> int:
    """Largest square tile (a multiple of `multiple`) whose body activations fit `memory_bytes`."""
    side = int(math.sqrt(memory_bytes / ACTIVATION_BYTES_PER_PIXEL))
    return max(multiple, side - side % multiple)


def tiles(size: int, tile: int, margin: int, multiple: int) -> Iterator[tuple[slice, slice]]:
    """Split [0, size) into (core, input) slices: cores cover it once, inputs add `margin`.

    All boundaries are multiples of `multiple`, so pooling sees the same grid as on the
    whole frame and the stitched result equals the whole-frame result.
    """
    count = max(1, math.ceil(size / tile))
    core = math.ceil(size / count / multiple) * multiple
    for start in range(0, size, core):
        stop = min(start + core, size)
        yield slice(start, stop), slice(max(0, start - margin), min(size, stop + margin))


@torch.inference_mode()
def denoise(
    denoiser: Denoiser,
    image: np.ndarray | torch.Tensor,
    noise_model: NoiseModel | None = None,
    tile: int | None = None,
    outputs: Sequence[str] = ("denoised",),
    chunk_elements: int = CHUNK_ELEMENTS,
    compiled: bool = False,
    bf16: bool | None = None,
    read_variance: np.ndarray | torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Denoise one frame in ADU; returns float32 (Y, X) arrays keyed by `outputs`.

    `image` is the (Y, X) frame, or for a denoiser with a temporal context its
    (channels, Y, X) window (`context.window`, NaN where a frame is missing or hidden).
    With a camera-maps noise model, `image` is equalised and `read_variance` (Y, X) holds its
    pixels' read-noise variance (`NoiseModel.camera_inputs`), read tile by tile and chunk by chunk.

    "denoised" is the MMSE estimate for PN2V (the network output for N2V / supervised);
    "prior_mean" and "posterior_std" are PN2V only. `tile` is the core tile side in pixels
    (None: chosen so the body's activations stay within TILE_MEMORY_BYTES). `compiled` fuses
    the per-pixel MMSE with torch.compile (slow first call, then several times faster). The
    U-Net body runs in bfloat16 when `bf16` (None: where the device computes it natively, see
    `native_bf16`); head and MMSE always in float32.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown or (denoiser.mode != "pn2v" and set(outputs) != {"denoised"}):
        raise ValueError(f"outputs {list(outputs)} not available for a {denoiser.mode} model")
    if denoiser.mode == "pn2v" and noise_model is None:
        raise ValueError("MMSE denoising with a pn2v model needs a noise model")
    net, device = denoiser.net.eval(), denoiser.device
    frame = torch.as_tensor(np.asarray(image, dtype=np.float32)).to(device)
    frame = frame[None] if frame.ndim == 2 else frame
    if frame.ndim != 3 or frame.shape[0] != denoiser.context.channels:
        raise ValueError(
            f"a model with context {denoiser.context} denoises ({denoiser.context.channels}, Y, X)"
            f" windows, not an array of shape {tuple(np.shape(image))}"
        )
    height, width = frame.shape[1:]
    multiple = net.size_multiple
    padded = _pad_to_multiple(frame, multiple)
    centre = padded[denoiser.context.before]
    # (H', W') ADU for a residual window. Eager, None skips a pass over every (pixels, K) chunk;
    # compiled, the zeros of other models cost nothing and one kernel serves every model.
    offset = denoiser.prior_offset(padded[None])[0] if denoiser.residual or compiled else None
    variance = None
    if read_variance is not None:
        variance = torch.as_tensor(np.ascontiguousarray(read_variance, np.float32)).to(device)
        if variance.shape != (height, width):
            raise ValueError(f"read_variance {tuple(variance.shape)} ≠ frame {(height, width)}")
        variance = _pad_to_multiple(variance[None], multiple)[0]
    result = {name: torch.empty(centre.shape, device=device) for name in outputs}
    margin = math.ceil(receptive_radius(net.depth) / multiple) * multiple
    tile = tile or auto_tile(TILE_MEMORY_BYTES, multiple)
    tile = max(multiple, tile - tile % multiple)
    for core_y, in_y in tiles(centre.shape[0], tile, margin, multiple):
        for core_x, in_x in tiles(centre.shape[1], tile, margin, multiple):
            with denoiser.body_autocast(bf16):
                features = net.body(denoiser.normalise(padded[:, in_y, in_x])[None])[0]
            inner = (
                slice(core_y.start - in_y.start, core_y.stop - in_y.start),
                slice(core_x.start - in_x.start, core_x.stop - in_x.start),
            )
            features = features[:, inner[0], inner[1]]
            estimates = _head_estimates(
                denoiser,
                features,
                centre[core_y, core_x],
                None if offset is None else offset[core_y, core_x],
                None if variance is None else variance[core_y, core_x],
                noise_model,
                outputs,
                chunk_elements,
                compiled,
            )
            for name, values in estimates.items():
                result[name][core_y, core_x] = values
    return {name: values[:height, :width].cpu().numpy() for name, values in result.items()}


def _pad_to_multiple(frame: torch.Tensor, multiple: int) -> torch.Tensor:
    """(C, H, W) → (C, H', W') with H', W' the next multiples of `multiple` (reflected edges)."""
    height, width = frame.shape[1:]
    pad_y, pad_x = (-height) % multiple, (-width) % multiple
    if pad_y == 0 and pad_x == 0:
        return frame
    mode = "reflect" if pad_y < height and pad_x < width else "replicate"
    return F.pad(frame[None], (0, pad_x, 0, pad_y), mode=mode)[0]


def _head_estimates(
    denoiser: Denoiser,
    features: torch.Tensor,
    observations: torch.Tensor,
    offset: torch.Tensor | None,
    read_variance: torch.Tensor | None,
    noise_model: NoiseModel | None,
    outputs: Sequence[str],
    chunk_elements: int,
    compiled: bool,
) -> dict[str, torch.Tensor]:
    """Per-pixel estimates from (F, h, w) features, (h, w) observations and (h, w) prior
    offsets (ADU, `Denoiser.prior_offset`; None: none), with the pixels' (h, w) read-noise
    variance for a camera-maps noise model (else None)."""
    height, width = observations.shape
    weight, bias = denoiser.head_in_adu()
    if denoiser.mode != "pn2v":
        denoised = torch.einsum("kf,fhw->khw", weight, features.float())[0] + bias[0]
        return {"denoised": denoised if offset is None else denoised + offset}
    pixels = height * width
    chunk = max(1, chunk_elements // denoiser.k)
    flat_features = features.permute(1, 2, 0).reshape(pixels, -1)  # in the body's dtype
    flat_observations, flat_offset, flat_variance = (
        None if values is None else values.reshape(-1)
        for values in (observations, offset, read_variance)
    )
    summarise = _chunk_summaries(noise_model, tuple(outputs), compiled)
    result = {name: torch.empty(pixels, device=features.device) for name in outputs}
    for start in range(0, pixels, chunk):
        part = slice(start, min(start + chunk, pixels))
        summaries = summarise(
            _chunk(flat_features, part, chunk).float(),
            weight,
            bias,
            _chunk(flat_observations, part, chunk),
            _chunk(flat_offset, part, chunk),
            _chunk(flat_variance, part, chunk, fill=1.0),
        )
        for name, values in summaries.items():
            result[name][part] = values[: part.stop - part.start]
    return {name: values.reshape(height, width) for name, values in result.items()}


def _chunk(
    values: torch.Tensor | None, part: slice, rows: int, fill: float = 0.0
) -> torch.Tensor | None:
    """Rows `part` of `values` (None stays None), padded with `fill` to `rows`: the last chunk
    too has the one static shape of the compiled kernel."""
    if values is None:
        return None
    values = values[part]
    missing = rows - values.shape[0]
    if missing == 0:
        return values
    return F.pad(values, (0, 0) * (values.ndim - 1) + (0, missing), value=fill)


def _chunk_summaries(
    noise_model: NoiseModel, outputs: tuple[str, ...], compiled: bool
) -> Callable[..., dict[str, torch.Tensor]]:
    """(chunk, F) features, head weight (K, F) and bias (K,), (chunk,) observations, prior offsets
    and read-noise variances (each or None) → summaries.

    With `compiled`, the head, likelihood and weighted sums are fused by torch.compile into
    one pass over each chunk; where compilation is unavailable it falls back to eager.
    """

    def summarise(features, weight, bias, observations, offset, read_variance):
        samples = torch.addmm(bias, features, weight.T)  # (chunk, K) ADU
        if offset is not None:
            samples += offset[:, None]
        return posterior_summaries(samples, observations, noise_model, outputs, read_variance)

    if not compiled or _COMPILE_FAILED:
        return summarise
    key = (id(noise_model), outputs)
    with _COMPILE_LOCK:  # frames denoised at once share one kernel
        if key not in _COMPILED:
            # One noise model at a time: a hot-swapped model replaces the old kernel, and
            # dynamo forgets the old ones, or past its recompile limit (8) it would run eager.
            _COMPILED.clear()
            torch.compiler.reset()
            _COMPILED[key] = _with_eager_fallback(
                torch.compile(summarise, dynamic=False), summarise
            )
        return _COMPILED[key]


_COMPILED: dict[tuple[int, tuple[str, ...]], Callable[..., dict[str, torch.Tensor]]] = {}
_COMPILE_LOCK = threading.Lock()
_COMPILE_FAILED = False


def _with_eager_fallback(compiled: Callable, eager: Callable) -> Callable:
    def run(*args):
        global _COMPILE_FAILED
        if not _COMPILE_FAILED:
            try:
                return compiled(*args)
            except Exception as error:  # no C++ compiler, unsupported op, ...: stay correct
                _COMPILE_FAILED = True
                log.warning("torch.compile unavailable (%s); using eager MMSE", error)
        return eager(*args)

    return run


def posterior_summaries(
    samples: torch.Tensor,
    observations: torch.Tensor,
    noise_model: NoiseModel,
    outputs: Sequence[str],
    read_variance: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 10 on (P, K) prior samples: posterior mean, and optionally prior mean, posterior std;
    `read_variance` (P,): the pixels' own read-noise variance (see `pixel_log_likelihood`)."""
    pixels = None if read_variance is None else read_variance[:, None]
    log_p = noise_model.pixel_log_likelihood(observations[:, None], samples, pixels)
    weights = torch.softmax(log_p, dim=1)
    mmse = (weights * samples).sum(dim=1)
    summaries = {"denoised": mmse}
    if "prior_mean" in outputs:
        summaries["prior_mean"] = samples.mean(dim=1)
    if "posterior_std" in outputs:
        variance = (weights * (samples - mmse[:, None]).square()).sum(dim=1)
        summaries["posterior_std"] = variance.sqrt()
    return {name: summaries[name] for name in outputs}
