"""Bench parts for the algorithm core: MMSE prediction and one PN2V training step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pn2v_live.core.context import SPATIAL, Context, window
from pn2v_live.core.inference import denoise
from pn2v_live.core.model import Denoiser, native_bf16, new_denoiser
from pn2v_live.core.noise import HistogramNoiseModel
from pn2v_live.core.synthetic import Camera, acquisition
from pn2v_live.core.training import Training
from pn2v_live.service.bench.measure import timed
from pn2v_live.service.bench.naive import naive_mmse, naive_pn2v_loss


def synthetic_setup(size: int, k: int, device: torch.device) -> tuple[Denoiser, Any, np.ndarray]:
    """An untrained K-sample denoiser (timing does not depend on the weights), a histogram
    noise model calibrated on a synthetic camera, and one noisy size×size frame."""
    camera = Camera(gain=2.0, offset=100.0, read_noise=3.0)
    frames, clean = acquisition(camera, frames=20, shape=(min(size, 256), min(size, 256)))
    noise_model = HistogramNoiseModel.fit(clean, frames).to(device)
    frame = camera.expose(np.resize(clean, (size, size)), np.random.default_rng(1))
    torch.manual_seed(0)
    denoiser = new_denoiser("pn2v", frame.mean(), frame.std(), k=k)
    denoiser.net.to(device)
    return denoiser, noise_model, frame.astype(np.float32)


def body_dtype(device: torch.device) -> str:
    """The dtype the U-Net body runs in by default on `device`."""
    return "bfloat16" if native_bf16(device) else "float32"


def bench_predict(
    size: int,
    k: int,
    device: torch.device,
    repeats: int,
    baseline: str | None,
    context: Context = SPATIAL,
) -> dict[str, Any]:
    """MMSE denoising of one size×size frame: fused (tiled, chunked, compiled, the body in
    bfloat16 where native) vs naive (float32); the difference is measured in float32, where the
    two formulations must agree. With a temporal `context`, also the time of a model with that
    window over the single-frame one's (`context_cost_ratio`)."""
    denoiser, noise_model, frame = synthetic_setup(size, k, device)
    fused = timed(lambda: denoise(denoiser, frame, noise_model, compiled=True), device, repeats)
    result: dict[str, Any] = {
        **fused,
        "frames_per_s": round(1 / fused["median_s"], 3),
        "body_dtype": body_dtype(denoiser.device),
    }
    if context != SPATIAL:
        result["context"] = str(context)
        result["context_cost_ratio"] = bench_context_cost(
            denoiser, noise_model, frame, context, repeats, fused["median_s"]
        )
    if baseline == "naive":
        last = {}  # the timed naive result, kept for the difference (one more run costs ~17 s)
        naive = timed(
            lambda: last.update(denoised=naive_mmse(denoiser, frame, noise_model)),
            device,
            repeats,
            warmup=0,
        )
        result["baseline"] = {"kind": "naive", **naive}
        result["speedup"] = round(naive["median_s"] / fused["median_s"], 2)
        difference = np.abs(
            denoise(denoiser, frame, noise_model, compiled=True, bf16=False)["denoised"]
            - last["denoised"]
        ).max()
        result["max_relative_difference"] = float(difference / np.abs(frame).max())
    return result


def bench_context_cost(
    spatial: Denoiser,
    noise_model: Any,
    frame: np.ndarray,
    context: Context,
    repeats: int,
    spatial_seconds: float,
) -> float:
    """Median time to denoise `frame` with a `context` window (its channels: noisy copies of
    `frame`) divided by `spatial_seconds`, the single-frame model's time in the same run."""
    torch.manual_seed(0)
    denoiser = new_denoiser("pn2v", spatial.mean, spatial.std, k=spatial.k, context=context)
    denoiser.net.to(spatial.device)
    rng = np.random.default_rng(3)
    stack = np.stack([frame + rng.normal(0, 3, frame.shape) for _ in range(context.channels)])
    timing = timed(
        lambda: denoise(
            denoiser, window(stack.astype(np.float32), context.before, context), noise_model,
            compiled=True,
        ),
        spatial.device,
        repeats,
    )  # fmt: skip
    return round(timing["median_s"] / spatial_seconds, 3)


def bench_train(
    size: int, k: int, device: torch.device, repeats: int, baseline: str | None, batch: int = 20
) -> dict[str, Any]:
    """One Adam step on `batch` patches of size×size (paper: 20 of 100×100, K = 800)."""
    denoiser, noise_model, frame = synthetic_setup(max(size, 128), k, device)
    rng = np.random.default_rng(2)
    corners = rng.integers(0, frame.shape[0] - size + 1, size=(batch, 2))
    patches = torch.from_numpy(
        np.stack([frame[y : y + size, x : x + size] for y, x in corners])[:, None]
    ).to(device)
    training = Training(denoiser, noise_model)
    fused = timed(lambda: training.step(patches), device, repeats)
    result: dict[str, Any] = {
        **fused,
        "patches_per_s": round(batch / fused["median_s"], 2),
        "body_dtype": body_dtype(denoiser.device),
    }
    if baseline == "naive":

        def naive_step() -> None:
            loss = naive_pn2v_loss(denoiser, patches, noise_model, training.fraction)
            training.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            training.optimizer.step()

        naive = timed(naive_step, device, repeats, warmup=0)
        result["baseline"] = {"kind": "naive", **naive}
        result["speedup"] = round(naive["median_s"] / fused["median_s"], 2)
        float32 = Training(denoiser, noise_model, bf16=False)
        fused_loss = float32.loss(patches, torch.Generator().manual_seed(3)).item()
        naive_loss = naive_pn2v_loss(
            denoiser, patches, noise_model, training.fraction, torch.Generator().manual_seed(3)
        ).item()
        result["loss_relative_difference"] = abs(fused_loss - naive_loss) / abs(naive_loss)
    return result
