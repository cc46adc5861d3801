"""Denoising quality on the shared FMD confocal data: PSNR of raw, N2V, PN2V and supervised.

The paper's protocol on our data: a noise model calibrated from some fields of view (mean of 50
frames as signal), self-supervised training on the target field's raw frames, supervised
training on the calibration fields' raw/gt pairs, each under the same wall-clock budget; PSNR of
the target's first frames against its ground truth.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pn2v_live.core.inference import denoise
from pn2v_live.core.metrics import psnr
from pn2v_live.core.model import new_denoiser, normalisation_of
from pn2v_live.core.noise.base import NoiseModel, as_pairs
from pn2v_live.core.training import train
from pn2v_live.pipeline.calibration import fit_models
from pn2v_live.storage.images import read_image, read_stack

FMD = "fmd_confocal_bpae"
DATA_RANGE = 255.0


def load_field(data_dir: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(50, 512, 512) raw frames and the (512, 512) ground truth of one field of view, float32."""
    folder = Path(data_dir) / FMD / field
    return (
        read_stack(folder / "raw.tif").astype(np.float32),
        read_image(folder / "gt.tif").astype(np.float32),
    )


def score(frames: np.ndarray, truth: np.ndarray) -> float:
    """Mean PSNR (dB, data range 255) of `frames` against `truth`."""
    return float(np.mean([psnr(frame, truth, DATA_RANGE) for frame in frames]))


def compare(
    data_dir: Path,
    noise_models: dict[str, NoiseModel],
    target: str = "fov03",
    supervised_fields: tuple[str, ...] = ("fov01", "fov02"),
    modes: tuple[str, ...] = ("n2v", "pn2v", "supervised"),
    minutes: float | None = 25.0,
    steps: int | None = None,
    k: int = 800,
    evaluate_frames: int = 5,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train each mode (PN2V once per noise model) for `minutes` (or `steps`, whichever ends
    first) and score the target's frames.

    Returns {"raw": dB, "n2v": dB, "pn2v[<noise model name>]": dB, "supervised": dB, ...}.
    """
    raw, truth = load_field(data_dir, target)
    test_frames = raw[:evaluate_frames]
    results = {"raw": score(test_frames, truth)}
    log(json.dumps({"target": target, "raw": results["raw"]}))
    runs: list[tuple[str, str, NoiseModel | None]] = []
    for mode in modes:
        if mode == "pn2v":
            runs += [("pn2v", f"pn2v[{name}]", model) for name, model in noise_models.items()]
        else:
            runs.append((mode, mode, None))
    for mode, name, noise_model in runs:
        if mode == "supervised":
            fields = [load_field(data_dir, field) for field in supervised_fields]
            frames = [np.stack([f, gt]) for stack, gt in fields for f in stack]
        else:
            frames = list(raw)
        mean, std = normalisation_of([f if f.ndim == 2 else f[0] for f in frames])
        torch.manual_seed(seed)  # the same initial weights for every run: differences are real
        denoiser = new_denoiser(mode, mean, std, k=k)
        started = time.monotonic()
        history = train(denoiser, frames, noise_model, steps=steps, minutes=minutes, seed=seed)
        trained = time.monotonic() - started
        denoised = np.stack(
            [denoise(denoiser, f, noise_model, compiled=True)["denoised"] for f in test_frames]
        )
        results[name] = score(denoised, truth)
        done = history[-1]["step"] if history else 0
        log(json.dumps({"run": name, "psnr": results[name], "steps": done, "seconds": trained}))
    return results


def calibrated_models(
    data_dir: Path,
    fields: tuple[str, ...] = ("fov01", "fov02"),
    kinds: tuple[str, ...] = ("histogram", "hybrid"),
    bins: int = 256,
) -> dict[str, NoiseModel]:
    """Noise models of `kinds` fitted on `fields` (each field's 50-frame mean as its signal)."""
    stacks = [load_field(data_dir, field)[0] for field in fields]
    pairs = [as_pairs(stack.mean(0), stack) for stack in stacks]
    signal = torch.cat([p[0] for p in pairs])
    observation = torch.cat([p[1] for p in pairs])
    fitted = fit_models(kinds, signal, observation, bins)
    return {kind: fitted[kind] for kind in kinds}
