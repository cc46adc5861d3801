"""Refining a calibrated noise model from the stream's (signal estimate, raw) pairs above its
signal range.

The calibration rarely covers the brightest signal of later experiments. The stream's signal
estimate of a frame is the mean of the other frames of its registered window
(`other_frames_mean`): noise is independent from frame to frame, so for a static scene that
estimate shares none of the frame's noise and needs no model, neither the noise model being
refined nor a network trained with it. `refine_noise_model` fits a hybrid model
(`core.calibration.fit_models`) to the (estimate, raw) pairs from the top OVERLAP_FRACTION of the
calibrated range upwards and joins it to the calibrated model across that overlap
(`RefinedNoiseModel`), after rescaling the pairs' spread to match the calibration in that overlap
(the estimate's own noise, σ²/n for n frames, adds to the spread). It refuses when the pairs'
spread in the overlap disagrees with the calibration by more than MAX_OVERLAP_VARIANCE_RATIO (a
scene that moves or changes between frames), and when the refined model does not explain
held-back pairs above the range better than the model in use (e.g. a Poisson–Gaussian or hybrid
calibration that extrapolates well already).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pn2v_live.core.calibration import MIN_PAIRS_PER_ROW, fit_models
from pn2v_live.core.noise import (
    NoiseModel,
    PoissonGaussianNoiseModel,
    RefinedNoiseModel,
    as_pairs,
)

OVERLAP_FRACTION = 0.2  # top share of the calibrated signal range the stream's fit joins across
MIN_OVERLAP_PAIRS = 200  # stream pairs in the overlap needed to compare with the calibration
# The stream's noise variance in the overlap must be within this factor of the calibration's.
MAX_OVERLAP_VARIANCE_RATIO = 2.0
HELD_OUT_FRACTION = 0.2  # pairs kept back to check that a refined model explains the stream better
MIN_NLL_GAIN = 0.005  # nats per pixel it must gain on them over the model in use
MIN_BINS = 16  # histogram rows of the stream's fit, at least ...
MAX_BINS = 256  # ... and at most; else one per MIN_PAIRS_PER_ROW pairs
DEFAULT_MIN_PAIRS = 10_000  # pairs above the calibrated range needed to refine
MIN_OTHER_FRAMES = 4  # other frames that must see a pixel for their mean to estimate its signal


class RefinementRefused(ValueError):
    """The stream's pairs cannot refine the model; the message says why."""


def calibrated_part(model: NoiseModel) -> NoiseModel:
    """The model from `pn2v-live calibrate` behind `model` (itself when not refined)."""
    return model.calibrated if isinstance(model, RefinedNoiseModel) else model


def join_range(calibrated: NoiseModel) -> tuple[float, float]:
    """Signal span (ADU) where a refined model blends from `calibrated` to the stream's fit."""
    low, high = calibrated.signal_range
    return high - OVERLAP_FRACTION * (high - low), high


def other_frames_mean(window: np.ndarray, centre: int) -> np.ndarray:
    """(Y, X) mean of the (channels, Y, X) registered `window`'s frames other than channel
    `centre` (NaN entries left out), NaN where fewer than MIN_OTHER_FRAMES of them see the pixel:
    the signal estimate of frame `centre` (module docstring)."""
    others = np.delete(np.asarray(window, dtype=np.float32), centre, axis=0)
    seen = np.isfinite(others).sum(0)
    mean = np.nansum(others, axis=0) / np.maximum(seen, 1)
    return np.where(seen >= MIN_OTHER_FRAMES, mean, np.nan).astype(np.float32)


def noise_variance(model: NoiseModel, signal: float, points: int = 8193) -> float:
    """Variance (ADU²) of x about `signal` under p(x | signal), by numerical integration."""
    reach = max(64.0, abs(signal) / 2)
    x = torch.linspace(signal - reach, signal + reach, points)
    with torch.no_grad():
        density = model.log_likelihood(x, torch.full_like(x, signal)).double().exp()
    return float((density * (x.double() - signal) ** 2).sum() / density.sum())


def refine_noise_model(
    current: NoiseModel,
    signal: np.ndarray | torch.Tensor,
    observation: np.ndarray | torch.Tensor,
    min_pairs: int = DEFAULT_MIN_PAIRS,
    refinement: dict[str, Any] | None = None,
) -> RefinedNoiseModel:
    """`current`'s calibrated model below its join range, a hybrid fit of the (signal,
    observation) pairs from the join range upwards above it (see the module docstring).

    `signal` are the stream's signal estimates (`other_frames_mean`, or any estimate that errs
    a little), `observation` the raw values, any matching shapes. An estimate's own error adds
    to the spread of x − s, so that spread is not quite the noise's: it is rescaled by the ratio
    measured in the overlap, where the calibration is trusted, which also makes the two parts
    meet. HELD_OUT_FRACTION of the pairs are kept back, and the refined model must explain those
    above `current`'s range better than `current` does.

    Raises RefinementRefused saying why when there are fewer than `min_pairs` pairs above the
    range, too few in the overlap, a noise ratio there beyond MAX_OVERLAP_VARIANCE_RATIO, or no
    held-out gain. `refinement` goes to metadata["refinement"], with the pair counts, overlap
    ratio, held-out NLLs and signal ranges added.
    """
    calibrated = calibrated_part(current)
    low, high = join_range(calibrated)
    signal, observation = as_pairs(signal, observation)
    keep = signal >= low
    signal, observation = signal[keep], observation[keep]
    top = current.signal_range[1]
    above = int((signal > top).sum())
    if above < min_pairs:
        raise RefinementRefused(
            f"{above} pairs with signal above {top:.0f} ADU, {min_pairs} needed"
        )
    overlap = signal <= high
    if int(overlap.sum()) < MIN_OVERLAP_PAIRS:
        raise RefinementRefused(
            f"only {int(overlap.sum())} pairs in the overlap {low:.0f}–{high:.0f} ADU with the "
            f"calibration, {MIN_OVERLAP_PAIRS} needed to join the two"
        )
    residual = (observation[overlap] - signal[overlap]).double()
    level = float(signal[overlap].mean())
    ratio = float(residual.var()) / noise_variance(calibrated, level)
    if not 1 / MAX_OVERLAP_VARIANCE_RATIO <= ratio <= MAX_OVERLAP_VARIANCE_RATIO:
        raise RefinementRefused(
            f"in the overlap with the calibration (around {level:.0f} ADU) the signal estimates "
            f"leave {ratio:.2f}× the calibrated noise variance: the scene changes too much "
            "between frames to measure the noise from"
        )
    observation = signal + (observation - signal) / math.sqrt(ratio)
    held = torch.rand(signal.numel(), generator=torch.Generator().manual_seed(0))
    held = held < HELD_OUT_FRACTION
    fit_s, fit_x = signal[~held], observation[~held]
    offset = calibrated.metadata.get("offset")
    try:
        poisson_gaussian = PoissonGaussianNoiseModel.fit(fit_s, fit_x, offset=offset)
    except ValueError as error:
        raise RefinementRefused(f"no noise level fits the pairs ({error})") from error
    bins = int(np.clip(fit_s.numel() // MIN_PAIRS_PER_ROW, MIN_BINS, MAX_BINS))
    stream = fit_models(("hybrid",), fit_s, fit_x, bins, poisson_gaussian)["hybrid"]
    stream.metadata.update(
        kind=stream.kind,
        pairs=int(fit_s.numel()),
        signal_range=[float(fit_s.min()), float(fit_s.max())],
        gain=poisson_gaussian.gain,
        offset=poisson_gaussian.offset,
        read_noise=poisson_gaussian.read_noise,
    )
    signal_range = (calibrated.signal_range[0], max(top, float(signal.max())))
    refined = RefinedNoiseModel(calibrated, stream, (low, high), signal_range)
    scored = held & (signal > top)
    before = current.nll(signal[scored], observation[scored])
    after = refined.nll(signal[scored], observation[scored])
    if not after < before - MIN_NLL_GAIN:
        raise RefinementRefused(
            f"the noise model in use already explains the held-back pairs above {top:.0f} ADU "
            f"as well ({before:.3f} nats per pixel; refined {after:.3f})"
        )
    refined.metadata = {
        **calibrated.metadata,
        "kind": RefinedNoiseModel.kind,
        "signal_range": list(signal_range),
        "refinement": {
            **(refinement or {}),
            "pairs": int(signal.numel()),
            "pairs_above": above,
            "overlap_variance_ratio": round(ratio, 4),
            "held_out_nll_above": {"before": round(before, 4), "after": round(after, 4)},
            "previous_signal_range": list(current.signal_range),
            "signal_range": list(signal_range),
            "join": [low, high],
        },
    }
    return refined
