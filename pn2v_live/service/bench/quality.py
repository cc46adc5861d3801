"""Denoising quality on the shared FMD confocal data: PSNR of raw, N2V, PN2V and supervised.

The paper's protocol on our data: a noise model calibrated from some fields of view (mean of 50
frames as signal), self-supervised training on the target field's raw frames, supervised
training on the calibration fields' raw/gt pairs, each under the same wall-clock budget; PSNR of
the target's first frames against its ground truth.

The ground truth is the average of all 50 frames, but the scene's brightness drifts during an
acquisition (fov03's frames 0–4 are 7 % brighter than its average, bleaching; fov02 and fov04
brighten instead), so a perfect denoiser of frame 0 still differs from it. Every score is also
given against the ground truth brought to each raw frame's brightness (`drift_corrected`),
which measures the denoising alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pn2v_live.core.calibration import fit_models
from pn2v_live.core.context import CANDIDATES, SPATIAL, Context, Windows, window
from pn2v_live.core.context_choice import train_choosing_context
from pn2v_live.core.inference import denoise
from pn2v_live.core.metrics import affine_fit, psnr
from pn2v_live.core.model import normalisation_of, seeded_denoisers
from pn2v_live.core.noise.base import NoiseModel, as_pairs
from pn2v_live.core.training import total_steps, train
from pn2v_live.storage.images import read_image, read_stack

FMD = "fmd_confocal_bpae"
FIELDS = ("fov01", "fov02", "fov03", "fov04")
FIELD_FRAMES = 50  # frames per field of view
DATA_RANGE = 255.0


def load_field(data_dir: Path, field: str) -> tuple[np.ndarray, np.ndarray]:
    """(FIELD_FRAMES, 512, 512) raw frames and the (512, 512) ground truth of one field of
    view, float32."""
    folder = Path(data_dir) / FMD / field
    return (
        read_stack(folder / "raw.tif").astype(np.float32),
        read_image(folder / "gt.tif").astype(np.float32),
    )


def drifting(raw: np.ndarray, truth: np.ndarray, px: int) -> tuple[np.ndarray, np.ndarray]:
    """A scene drifting by `px` pixels per frame, made from a static (T, Y, X) field: frame t is
    the crop of columns t·px … t·px + X − (T−1)·px, so the noise stays the camera's own; returns
    the (T, Y, X') raw frames and their (T, Y, X') ground truths (the same crops of `truth`)."""
    frames, _, width = raw.shape
    kept = width - (frames - 1) * px
    if kept < 64:
        raise ValueError(f"{px} px per frame over {frames} frames leaves {kept} of {width} columns")
    columns = [slice(t * px, t * px + kept) for t in range(frames)]
    crops = np.stack([frame[:, c] for frame, c in zip(raw, columns, strict=True)])
    return crops, np.stack([truth[:, c] for c in columns])


def drift_corrected(frame: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """`truth` (Y, X) scaled and shifted to the brightness of the raw `frame` (Y, X): the least-
    squares fit frame ≈ gain · truth + offset, float32."""
    gain, offset = affine_fit(truth, frame)
    return (gain * truth + offset).astype(np.float32)


def scored_frames(frames: int, count: int, spread: bool) -> list[int]:
    """Indices of the `count` frames scored out of `frames`: the first ones, or with `spread`
    every (frames / count)-th from frame 0."""
    if not spread:
        return list(range(min(count, frames)))
    return sorted({t * frames // count for t in range(min(count, frames))})


def score(frames: np.ndarray, references: np.ndarray | list[np.ndarray]) -> float:
    """Mean PSNR (dB, data range 255) of `frames` (N, Y, X) against `references`: one (Y, X)
    image for all frames, or one per frame."""
    if isinstance(references, np.ndarray) and references.ndim == 2:
        references = [references] * len(frames)
    return float(np.mean([psnr(f, r, DATA_RANGE) for f, r in zip(frames, references, strict=True)]))


@dataclass(frozen=True)
class QualitySettings:
    """What `compare` trains and scores, the same for every seed: the target field, the `modes`
    (PN2V once per noise model and temporal context in `contexts`, None meaning "auto"), each
    trained for `minutes` (or `steps`, whichever ends first) with `k` prior samples; the
    target's first `score_frames` frames are scored, or with `score_spread` that many spread
    evenly over the acquisition (where a temporal window is whole for most of them); with
    `drift` (pixels per frame) the target is `drifting`."""

    target: str = "fov03"
    modes: tuple[str, ...] = ("n2v", "pn2v", "supervised")
    minutes: float | None = 25.0
    steps: int | None = None
    k: int = 800
    score_frames: int = 5
    score_spread: bool = False
    contexts: tuple[Context | None, ...] = (SPATIAL,)
    drift: int = 0


def compare(
    data_dir: Path,
    noise_models: dict[str, NoiseModel],
    settings: QualitySettings,
    seed: int = 0,
    supervised_fields: tuple[str, ...] = ("fov01", "fov02"),
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """Train each mode of `settings` with `seed` and score the target's frames against the
    ground truth and against the ground truth corrected for drift (see the module docstring);
    supervised training uses `supervised_fields`. A PN2V model with temporal context is also
    scored on its causal (live) twins, as "<name> live".

    Returns {"psnr_db": {"raw": dB, "n2v": dB, "pn2v[<noise model>,<context>]": dB,
    "supervised": dB, ...}, "psnr_drift_corrected_db": {the same names: dB}}.
    """
    drift, k = settings.drift, settings.k
    raw, truth = load_field(data_dir, settings.target)
    raw, truths = drifting(raw, truth, drift) if drift else (raw, [truth] * len(raw))
    scored = scored_frames(len(raw), settings.score_frames, settings.score_spread)
    test_frames = raw[scored]
    references = [truths[t] for t in scored]
    corrected = [drift_corrected(f, t) for f, t in zip(test_frames, references, strict=True)]
    results: dict[str, dict[str, float]] = {"psnr_db": {}, "psnr_drift_corrected_db": {}}

    def record(name: str, frames: np.ndarray, **facts: object) -> None:
        scores = {
            "psnr": score(frames, references),
            "psnr_drift_corrected": score(frames, corrected),
        }
        results["psnr_db"][name] = scores["psnr"]
        results["psnr_drift_corrected_db"][name] = scores["psnr_drift_corrected"]
        log(json.dumps({"run": name, "seed": seed, "drift": drift, **scores, **facts}))

    record("raw", test_frames)
    runs: list[tuple[str, str, NoiseModel | None, Context | None]] = []
    for mode in settings.modes:
        if mode == "pn2v":
            runs += [
                ("pn2v", f"pn2v[{name},{context or 'auto'}]", model, context)
                for name, model in noise_models.items()
                for context in settings.contexts
            ]
        else:
            runs.append((mode, mode, None, SPATIAL))
    for mode, name, noise_model, context in runs:
        series, run_truths = [raw], None
        if mode == "supervised":
            fields = [load_field(data_dir, field) for field in supervised_fields]
            series = [stack for stack, _ in fields]
            run_truths = [[gt] * len(stack) for stack, gt in fields]
        mean, std = normalisation_of([f for stack in series for f in stack])
        make_denoiser = seeded_denoisers(mode, mean, std, k, seed)
        started = time.monotonic()
        budget = dict(steps=settings.steps, minutes=settings.minutes, seed=seed)
        if context is None:
            denoiser, losses = train_choosing_context(
                make_denoiser, series, CANDIDATES, noise_model, truths=run_truths, **budget
            )
        else:
            denoiser, losses = make_denoiser(context), {}
            frames = Windows(series, context, truths=run_truths)
            train(denoiser, frames, noise_model, **budget)
        trained = time.monotonic() - started
        history = denoiser.history
        last = history[-1] if history else {"step": 0, "batch_size": 0}
        chosen = denoiser.context
        views = [(name, chosen)] + ([(f"{name} live", chosen.causal)] if chosen.after else [])
        for view_name, visible in views:
            windows = [window(raw, t, chosen, visible) for t in scored]
            denoised = np.stack(
                [denoise(denoiser, w, noise_model, compiled=True)["denoised"] for w in windows]
            )
            record(
                view_name, denoised, context=str(chosen), context_validation_loss=losses,
                steps=total_steps(history), batch_size=last["batch_size"], seconds=trained,
            )  # fmt: skip
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
