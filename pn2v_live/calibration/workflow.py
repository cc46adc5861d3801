"""The calibration workflow: static-scene acquisitions → checks → (signal, observation) pairs →
noise models compared by held-out NLL → the chosen model, a report figure and a JSON summary.

The signal is each acquisition's per-pixel mean over all its frames (or a given clean image, or
N2V predictions in bootstrap mode). The last HELD_OUT_FRACTION of every acquisition's frames
are held back from fitting and score the models (mean NLL in nats per pixel, whole-number data
dequantised). Every check that fails raises UserError before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pn2v_live.core.calibration import (
    HELD_OUT_FRACTION,
    MIN_PAIRS_PER_ROW,
    CalibrationResult,
    brightness_drift,
    clipped_fraction,
    fit_models,
    frame_shift,
    gather_pairs,
    split,
)
from pn2v_live.core.noise import PoissonGaussianNoiseModel, darkest_level
from pn2v_live.core.noise.histogram import common_range, pair_counts
from pn2v_live.errors import UserError
from pn2v_live.storage.images import read_stack_metadata
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.physical import Physical

log = logging.getLogger(__name__)

KINDS = ("hybrid", "histogram", "gmm", "poisson-gaussian")
DEFAULT_KIND = "hybrid"  # lowest held-out NLL on the shared confocal data, robust out of range
MIN_FRAMES = 8  # below this the per-pixel mean is too noisy to serve as the signal
MAX_SHIFT_PX = 1.5  # a frame displaced this much against the others means the scene moved
WARN_SHIFT_PX = 0.5  # sub-pixel drift: accepted with a warning
MAX_BRIGHTNESS_DRIFT = 0.03  # brightness change over a series (bleaching) that gets a warning
MAX_SATURATED_FRACTION = 1e-3  # pixels at the camera's maximum (or minimum)
# Patches per bootstrap step on every device: `calibrate --bootstrap`'s default of 400 steps was
# measured with 16, and N2V gains nothing from smaller steps in the same time.
BOOTSTRAP_BATCH_SIZE = 16
MIN_SIGNAL_SPAN_SIGMAS = 3  # signal range in units of the noise std at the brightest level
SUPPORT_PAIRS = 1000  # rows with at least this many pairs count as well calibrated


@dataclass
class Acquisition:
    """One calibration input: a name for messages, its frames (T, Y, X) in the camera dtype and
    the physical sizes its metadata give."""

    name: str
    frames: np.ndarray
    physical: Physical = field(default_factory=Physical)


def read_acquisition(path: str | Path) -> Acquisition:
    """Frames of a TIFF/OME-TIFF stack, a folder of frames, or a `<name>.ome.zarr` acquisition of
    the project's store (its stored frames [0, valid_t))."""
    path = Path(path)
    if path.name.endswith(".ome.zarr"):
        from pn2v_live.storage.layout import SUFFIX
        from pn2v_live.storage.store import Store

        store = Store(path.parent)
        try:
            acquisition = store.acquisition(path.name[: -len(SUFFIX)])
            frames = np.stack([acquisition.read_raw(t) for t in range(acquisition.valid_t)])
        except (KeyError, ValueError) as error:
            raise UserError(f"{path}: not a readable acquisition of the store ({error})") from error
        finally:
            store.close()
        return Acquisition(path.name[: -len(SUFFIX)], frames, acquisition.physical)
    frames, metadata = read_stack_metadata(path)
    return Acquisition(path.name, frames, metadata.physical)


def pixel_size(acquisitions: list[Acquisition], warnings: list[str]) -> list[float] | None:
    """The inputs' pixel size [y, x] in µm, recorded with the model (None when none says);
    inputs that give different ones (another binning or objective?) add a warning."""
    sizes = {a.physical.pixel_size_um for a in acquisitions} - {None}
    if len(sizes) > 1:
        warnings.append(
            f"inputs differ in pixel size ({', '.join(f'{y:g} x {x:g} µm' for y, x in sizes)}): "
            "a noise model holds for one camera setting; is the binning the same?"
        )
    first = next((a.physical.pixel_size_um for a in acquisitions if a.physical.pixel_size_um), None)
    return list(first) if first else None


def check_acquisitions(acquisitions: list[Acquisition], bins: int, bootstrap: bool) -> list[str]:
    """Refuse inputs that cannot give a trustworthy noise model (UserError says what to do);
    returns warnings about inputs that are usable but not ideal."""
    warnings = []
    shapes = {a.frames.shape[1:] for a in acquisitions}
    dtypes = {str(a.frames.dtype) for a in acquisitions}
    if len(dtypes) > 1:
        found = ", ".join(f"{a.name}: {a.frames.dtype}" for a in acquisitions)
        raise UserError(
            f"inputs mix camera data types ({found}); calibrate each camera setting separately"
        )
    if len(shapes) > 1 and not bootstrap:
        found = ", ".join(f"{a.name}: {a.frames.shape[1:]}" for a in acquisitions)
        raise UserError(f"inputs mix frame shapes ({found}); use one sensor region per calibration")
    minimum = 2 if bootstrap else MIN_FRAMES
    for a in acquisitions:
        if len(a.frames) < minimum:
            raise UserError(
                f"{a.name}: {len(a.frames)} frame(s); calibration needs at least {minimum} frames "
                "of a static scene (50 or more recommended), or use --bootstrap on noisy images"
            )
    pixels = sum(a.frames.size for a in acquisitions) * (1 - HELD_OUT_FRACTION)
    if pixels / bins < MIN_PAIRS_PER_ROW:
        raise UserError(
            f"{pixels:.0f} calibration pairs are too few for {bins} signal bins (need about "
            f"{MIN_PAIRS_PER_ROW} per bin, {MIN_PAIRS_PER_ROW * bins}); acquire more frames or "
            "pass fewer --bins"
        )
    for a in acquisitions:
        high, low = clipped_fraction(a.frames)
        if max(high, low) > MAX_SATURATED_FRACTION:
            level, fraction = ("maximum", high) if high >= low else ("minimum", low)
            raise UserError(
                f"{a.name}: {fraction:.2%} of the pixels sit at the camera's {level} "
                f"({np.iinfo(a.frames.dtype).max if level == 'maximum' else 0}); clipped pixels "
                "distort the noise model — lower the exposure/gain (or raise the offset) and "
                "acquire again"
            )
        if bootstrap:
            continue
        motion = frame_shift(a.frames)
        if motion is None:
            warnings.append(
                f"{a.name}: too little structure to check the scene for motion; make sure the "
                "sample and stage did not move"
            )
            continue
        index, shift = motion
        found = f"frame {index} is shifted by {shift[0]:+.1f}, {shift[1]:+.1f} px (y, x)"
        if max(map(abs, shift)) >= MAX_SHIFT_PX:
            raise UserError(
                f"{a.name}: the scene is not static — {found} against the others; fix the "
                "stage or focus drift and acquire again, or use --bootstrap"
            )
        if max(map(abs, shift)) >= WARN_SHIFT_PX:
            warnings.append(
                f"{a.name}: slight drift — {found} against the others; edges of structures "
                "will look noisier than they are"
            )
        drift, error = brightness_drift(a.frames)
        if drift > max(MAX_BRIGHTNESS_DRIFT, 3 * error):
            warnings.append(
                f"{a.name}: the brightness changes by {drift:.1%} from the first to the last "
                "frame (bleaching or illumination drift); the mean of the frames misses that "
                "change, so the noise model comes out wider than the camera's — lower the "
                "excitation, acquire fewer frames, or image a sample that does not bleach"
            )
    return warnings


def check_signal_span(model: PoissonGaussianNoiseModel) -> None:
    """Refuse a signal range too narrow to tell signal-dependent noise apart."""
    low, high = model.signal_range
    sigma = float(model.variance(torch.tensor(high)).sqrt())
    if high - low < MIN_SIGNAL_SPAN_SIGMAS * sigma:
        raise UserError(
            f"the calibration signal spans only {low:.1f}–{high:.1f} ADU, less than "
            f"{MIN_SIGNAL_SPAN_SIGMAS} noise standard deviations ({sigma:.1f} ADU); image a "
            "pattern with dark and bright areas (or several exposures) covering the intensities "
            "of your experiments"
        )


def calibrate(
    acquisitions: list[Acquisition],
    kind: str = DEFAULT_KIND,
    bins: int = 256,
    camera: str = "",
    signal: np.ndarray | None = None,
    offset: float | None = None,
    bootstrap_signals: list[np.ndarray] | None = None,
) -> CalibrationResult:
    """Check the inputs, fit the models and score them on held-out frames.

    `kind` is one of KINDS or "all" (fit every kind, choose the lowest held-out NLL). `signal` is
    a clean (Y, X) image for every acquisition instead of their means; `bootstrap_signals` are
    per-frame (T, Y, X) signal estimates (see `bootstrap_signal`). `offset` is the camera's black
    level in ADU (default: the level of the scene's darkest pixels).
    """
    if kind != "all" and kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)} or all, not {kind!r}")
    bootstrap = bootstrap_signals is not None
    warnings = check_acquisitions(acquisitions, bins, bootstrap)
    if signal is not None and signal.shape != acquisitions[0].frames.shape[1:]:
        raise UserError(
            f"--signal: clean image shape {signal.shape} differs from the frames' "
            f"{acquisitions[0].frames.shape[1:]}"
        )
    if bootstrap:
        signals = bootstrap_signals
    elif signal is not None:
        signals = [signal.astype(np.float32)] * len(acquisitions)
    else:
        signals = [a.frames.mean(0, dtype=np.float64).astype(np.float32) for a in acquisitions]
    if offset is None and min(len(a.frames) for a in acquisitions) >= 2:
        offset = min(darkest_level(a.frames) for a in acquisitions)
    signal_frames = None if (bootstrap or signal is not None) else len(acquisitions[0].frames)
    (fit_s, fit_x), (held_s, held_x) = gather_pairs([a.frames for a in acquisitions], signals)
    kinds = KINDS if kind == "all" else (kind,)
    poisson_gaussian = PoissonGaussianNoiseModel.fit(
        fit_s, fit_x, offset=offset, signal_frames=signal_frames
    )
    check_signal_span(poisson_gaussian)  # before the costlier fits
    fitted = fit_models(kinds, fit_s, fit_x, bins, poisson_gaussian)
    models = {k: fitted[k] for k in kinds}
    held_out_nll = {k: round(m.nll(held_s, held_x), 5) for k, m in models.items()}
    chosen = min(held_out_nll, key=held_out_nll.get)
    low, high = common_range(fit_s, fit_x, bins)
    support = pair_counts(fit_s, fit_x, bins, (low, high)).sum(1)
    edges = np.linspace(low, high, bins + 1)
    well_supported = np.flatnonzero(support.numpy() >= SUPPORT_PAIRS)
    summary = {
        "camera": camera,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "inputs": [a.name for a in acquisitions],
        "frames": sum(len(split(a.frames)[0]) for a in acquisitions),
        "held_out_frames": sum(len(split(a.frames)[1]) for a in acquisitions),
        "pixels": int(sum(np.prod(a.frames.shape[1:]) for a in acquisitions)),
        "pairs": int(fit_s.numel()),
        "signal_range": [round(float(fit_s.min()), 3), round(float(fit_s.max()), 3)],
        "observation_range": [float(fit_x.min()), float(fit_x.max())],
        "well_supported_signal_max": (
            round(float(edges[well_supported.max() + 1]), 3) if len(well_supported) else None
        ),
        "held_out_nll": held_out_nll,
        "gain": round(poisson_gaussian.gain, 5),
        "offset": round(poisson_gaussian.offset, 5),
        "read_noise": round(poisson_gaussian.read_noise, 5),
        "bootstrapped": bootstrap,
        "chosen": chosen,
        "pixel_size_um": pixel_size(acquisitions, warnings),
    }
    if summary["well_supported_signal_max"] is not None:
        top = summary["well_supported_signal_max"]
        if top < 0.5 * summary["signal_range"][1]:
            warnings.append(
                f"signal rows above {top:.0f} ADU hold fewer than {SUPPORT_PAIRS} pairs each; "
                "there the model leans on its parametric part — include brighter areas for a "
                "better calibration"
            )
    for model in models.values():
        model.metadata.update(summary, row_support=support.tolist(), kind=model.kind)
    for message in warnings:
        log.warning(message)
    return CalibrationResult(models, chosen, poisson_gaussian, (fit_s, fit_x), summary, warnings)


def bootstrap_signal(
    acquisitions: list[Acquisition],
    steps: int | None,
    minutes: float | None,
    seed: int = 0,
    **training: Any,
) -> list[np.ndarray]:
    """Signal estimates (T, Y, X) per acquisition from an N2V network trained on the noisy frames
    themselves (Prakash et al.'s bootstrap), for calibrating without a test pattern. `training`
    goes to `core.training.train` (e.g. batch_size, patch_size)."""
    from pn2v_live.core.inference import denoise
    from pn2v_live.core.model import new_denoiser
    from pn2v_live.core.training import train

    frames = [f.astype(np.float32) for a in acquisitions for f in a.frames]
    values = np.concatenate([f.ravel() for f in frames])
    denoiser = new_denoiser("n2v", mean=float(values.mean()), std=float(values.std()))
    log.info("bootstrap: training N2V on %d noisy frames", len(frames))
    training.setdefault("batch_size", BOOTSTRAP_BATCH_SIZE)
    train(denoiser, frames, steps=steps, minutes=minutes, seed=seed, **training)
    return [
        np.stack([denoise(denoiser, f.astype(np.float32))["denoised"] for f in a.frames])
        for a in acquisitions
    ]


def write_outputs(
    result: CalibrationResult, output: Path, report: Path | None, everything: bool
) -> dict[str, Any]:
    """Save the chosen model at `output` (with `everything`, the others beside it as
    `<stem>.<kind><suffix>`), the report figure, and return the summary with the paths."""
    save_noise_model(result.models[result.chosen], output)
    written = {result.chosen: str(output)}
    if everything:
        for kind, model in result.models.items():
            if kind != result.chosen:
                path = output.with_name(f"{output.stem}.{kind}{output.suffix}")
                written[kind] = str(save_noise_model(model, path))
    summary = dict(result.summary, output=str(output), files=written, warnings=result.warnings)
    if report is not None:
        from pn2v_live.calibration.report import write_report

        write_report(result, report)
        summary["report"] = str(report)
    return summary


def calibrate_stack(frames: np.ndarray, path: str | Path, camera: str = "") -> CalibrationResult:
    """Calibrate the default model from one static-scene stack (T, Y, X) and save it at `path`."""
    result = calibrate([Acquisition("calibration", frames)], camera=camera)
    save_noise_model(result.models[result.chosen], path)
    return result
