"""PN2V with and without sCMOS camera maps on synthetic sCMOS data (issue 26, acceptance 2).

Both runs calibrate their noise model the usual way, on a separate static-scene acquisition (the
hybrid model; with maps on the equalised frames, wrapped per pixel by the maps), then train the
same network for the same steps on the same raw stack and denoise its first frames. Printed: PSNR
against the clean signal (range: its max − min), and the fixed-pattern residual: the correlation
of the denoised frame, and of its error, with the offset map.

    OMP_NUM_THREADS=1 python -m pn2v_live.service.bench.scmos --seed 0 --init-seed 0 1 2 3 4

The defaults are those of calibration/scmos.md: 128² frames, 800 training steps, K = 800,
64² patches, 0.5 % hot pixels with 10× the typical read noise (rms; `--hot-factor` is the
variance ratio).

`--seed` draws the data (maps, scene, noise); `--init-seed` (default: `--seed`) the network's
initialisation and the patch sampling. Several init seeds score one data set over as many
training draws: one JSON line each, then the gain's mean, standard deviation and minimum.

`--memory` instead measures the peak resident memory of one MMSE (Eq. 10) of a `--size`² frame
with K = `--k` and camera maps on the CPU (issue 26, acceptance 4: 512², K = 800 under 1 GB).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from pn2v_live.calibration.workflow import Acquisition, calibrate
from pn2v_live.core.camera import CameraMaps
from pn2v_live.core.inference import denoise
from pn2v_live.core.metrics import psnr
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import CameraNoiseModel, NoiseModel
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.core.training import train


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def run(
    noise_model: NoiseModel, raw: np.ndarray, clean: np.ndarray, maps: CameraMaps, args
) -> dict:
    """Train on `raw` (T, H, W) with `noise_model`, denoise frames 0..args.scored-1, score; the
    squared error (ADU²) is also split between the camera's hot pixels and the others."""
    offset, hot = maps.offset, maps.hot_pixels()
    frames, variance = noise_model.camera_inputs(raw)
    init_seed = training_seed(args)
    torch.manual_seed(init_seed)
    denoiser = new_denoiser("pn2v", float(frames.mean()), float(frames.std()), k=args.k)
    inputs = list(frames) if variance is None else [np.stack([f, variance]) for f in frames]
    started = time.monotonic()
    history = train(
        denoiser, inputs, noise_model, steps=args.steps, patch_size=args.patch, seed=init_seed
    )
    seconds = time.monotonic() - started
    data_range = float(clean.max() - clean.min())
    scores, whole, residual, errors = [], [], [], []
    for frame in frames[: args.scored]:
        denoised = denoise(denoiser, frame, noise_model, read_variance=variance)["denoised"]
        errors.append(np.square(denoised - clean, dtype=np.float64))
        scores.append(psnr(denoised, clean, data_range))
        whole.append(correlation(denoised, offset))
        residual.append(correlation(denoised - clean, offset))
    return {
        "psnr_db": round(float(np.mean(scores)), 3),
        "offset_correlation": round(float(np.mean(whole)), 4),
        "residual_offset_correlation": round(float(np.mean(residual)), 4),
        "mse_hot": round(float(np.mean([e[hot].mean() for e in errors])), 2),
        "mse_other": round(float(np.mean([e[~hot].mean() for e in errors])), 2),
        "raw_psnr_db": round(
            float(np.mean([psnr(x, clean, data_range) for x in raw[: args.scored]])), 3
        ),
        "validation_loss": round(min(r["validation_loss"] for r in history), 4),
        "prior_spread": round(history[-1].get("prior_spread", 1.0), 3),
        "training_seconds": round(seconds, 1),
    }


def training_seed(args) -> int:
    """The seed of the network's initialisation and patch sampling: `args.init_seed`, else the
    data's `args.seed`."""
    init_seed = getattr(args, "init_seed", None)
    return args.seed if init_seed is None else init_seed


def gain_summary(gains: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one run) and minimum of the gains (dB)."""
    values = np.asarray(gains, dtype=np.float64)
    sd = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {
        "runs": len(values),
        "gain_db_mean": round(float(values.mean()), 3),
        "gain_db_sd": round(sd, 3),
        "gain_db_min": round(float(values.min()), 3),
    }


def mmse_memory(size: int, k: int, seed: int, bf16: bool | None) -> dict:
    """Peak resident memory (MB, `measure.PeakMemory`) of this process while one `size`² frame
    is denoised with K = `k` and camera maps on the CPU (U-Net body in bfloat16: `bf16`, None:
    where native), and the memory before it."""
    import psutil

    from pn2v_live.service.bench.measure import PeakMemory

    maps = scmos_maps((size, size), seed=seed)
    model = CameraNoiseModel.from_maps(maps, (100.0, 2000.0))
    frame, variance = model.camera_inputs(ScmosCamera(maps).acquisition(1, seed=seed)[0][0])
    torch.manual_seed(seed)
    denoiser = new_denoiser("pn2v", float(frame.mean()), float(frame.std()), k=k)
    before = psutil.Process().memory_info().rss / 2**20
    started = time.monotonic()
    with PeakMemory(torch.device("cpu")) as memory:
        denoise(denoiser, frame, model, bf16=bf16, read_variance=variance)
    return {
        "size": size,
        "k": k,
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(memory.peak_rss_mb, 1),
        "seconds": round(time.monotonic() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "body": "float32" if bf16 is False else "native precision",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--k", type=int, default=800)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--scored", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the data's seed")
    parser.add_argument(
        "--init-seed",
        type=int,
        nargs="+",
        default=None,
        help="network init and patches, one run each (default: --seed)",
    )
    parser.add_argument(
        "--hot-factor", type=float, default=100.0, help="hot pixels' read-noise variance / typical"
    )
    parser.add_argument("--memory", action="store_true", help="peak memory of one MMSE instead")
    parser.add_argument("--float32", action="store_true", help="--memory: U-Net body in float32")
    args = parser.parse_args()
    if args.memory:
        bf16 = False if args.float32 else None
        print(json.dumps(mmse_memory(args.size, args.k, args.seed, bf16)))
        return
    maps = scmos_maps((args.size, args.size), seed=args.seed, hot_factor=args.hot_factor)
    camera = ScmosCamera(maps)
    pattern, _ = camera.acquisition(50, seed=args.seed + 1)  # the calibration acquisition
    raw, clean = camera.acquisition(args.frames, seed=args.seed + 2)
    without = calibrate([Acquisition("pattern", pattern)])
    equalised = calibrate([Acquisition("pattern", maps.equalise(pattern))])
    models = {
        "without_maps": without.models[without.chosen],
        "with_maps": CameraNoiseModel(equalised.models[equalised.chosen], maps),
    }
    gains = []
    for init_seed in args.init_seed or [args.seed]:
        settings = argparse.Namespace(**{**vars(args), "init_seed": init_seed})
        result = {name: run(model, raw, clean, maps, settings) for name, model in models.items()}
        gains.append(result["with_maps"]["psnr_db"] - result["without_maps"]["psnr_db"])
        result["gain_db"] = round(gains[-1], 3)
        result["settings"] = vars(settings)
        print(json.dumps(result), flush=True)
    if len(gains) > 1:
        print(json.dumps(gain_summary(gains)))


if __name__ == "__main__":
    main()
