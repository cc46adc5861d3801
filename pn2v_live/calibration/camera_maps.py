"""Calibrating sCMOS camera maps (`core.camera`): from a dark series and flat-field series at
several light levels, or from map files a user already has, with checks that refuse what would
give wrong maps (UserError says what to do) and warnings for what is usable but not ideal.

Per pixel i: the dark series' temporal mean is offset_i and its temporal variance the read-noise
variance_i; each flat level L gives a mean m_L and a temporal variance v_L, and the gain is the
photon-transfer slope through the dark point, v_L − variance_i = gain_i · (m_L − offset_i),
fitted by least squares over the levels weighted by T_L / median(v_L)² (about the inverse
variance of v_L).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pn2v_live.calibration.workflow import MAX_SATURATED_FRACTION, Acquisition
from pn2v_live.core.calibration import clipped_fraction
from pn2v_live.core.camera import HOT_FACTOR, CameraMaps
from pn2v_live.errors import UserError

log = logging.getLogger(__name__)

MIN_FRAMES = 20  # per series: fewer cannot give per-pixel variances at all
GOOD_FRAMES = 100  # per series: below this per-pixel variances are noisier than ±15 %
MIN_LEVELS = 2  # flat-field light levels for a photon-transfer slope
MIN_FLAT_ELECTRONS = 20.0  # a flat level's median signal above the dark, in photo-electrons
STEADY_RATIO = 4.0  # frame means may vary this many times more than pixel noise alone allows
LEAK_CORRELATION = 0.3  # dark: correlation of per-pixel mean and variance that means light
BELOW_OFFSET_SIGMAS = 3.0  # fit check: raw values this far below the offset map ...
BELOW_OFFSET_SHARE = 0.01  # ... in more than this share of the values: the map is too high
# Φ(−3 σ): the largest share of values read noise puts that far below the offset (no light).
READ_NOISE_TAIL = 0.5 * math.erfc(BELOW_OFFSET_SIGMAS / math.sqrt(2))
GAIN_AGREEMENT = 0.25  # fit check: relative difference of map gain and photon-transfer slope


@dataclass
class CameraCalibration:
    """Calibrated maps, per-level points of the photon-transfer curve (median signal and
    variance above the dark, ADU and ADU²), the summary numbers and the warnings."""

    maps: CameraMaps
    transfer: list[tuple[float, float]]
    summary: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def temporal_moments(series: Acquisition) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel temporal mean and variance (ddof 1) of a (T, H, W) series, float64."""
    frames = series.frames.astype(np.float64)
    return frames.mean(0), frames.var(0, ddof=1)


def check_series(series: Acquisition, what: str, warnings: list[str]) -> None:
    """Refuse a series too short, clipped, or whose illumination is not steady (frame means
    varying more than STEADY_RATIO times what the pixels' noise allows)."""
    frames = series.frames
    if frames.ndim != 3 or len(frames) < MIN_FRAMES:
        raise UserError(
            f"{series.name}: {len(frames)} frame(s); a {what} needs at least {MIN_FRAMES} "
            f"frames ({GOOD_FRAMES} or more recommended) for per-pixel maps"
        )
    if len(frames) < GOOD_FRAMES:
        warnings.append(
            f"{series.name}: {len(frames)} frames; per-pixel variances from fewer than "
            f"{GOOD_FRAMES} frames are uncertain by ±{np.sqrt(2 / len(frames)):.0%}"
        )
    refuse_clipped(series)
    means = frames.reshape(len(frames), -1).mean(1, dtype=np.float64)
    pixel_variance = frames.var(0, ddof=1, dtype=np.float64).mean()
    ratio = means.var(ddof=1) / (pixel_variance / frames[0].size)
    if ratio > STEADY_RATIO:
        raise UserError(
            f"{series.name}: the {what}'s frame means vary {np.sqrt(ratio):.1f}× more than its "
            "pixels' noise allows (flicker, drift, bleaching, or stray light); use a steady "
            "light source (or, for a dark series, cover the camera completely) and acquire again"
        )


def refuse_clipped(series: Acquisition) -> None:
    """Refuse a series with more than MAX_SATURATED_FRACTION of its values at the camera's
    maximum or minimum: clipped values have neither the mean nor the variance of the pixel."""
    high, low = clipped_fraction(series.frames)
    if max(high, low) > MAX_SATURATED_FRACTION:
        raise UserError(
            f"{series.name}: {max(high, low):.2%} of the values are clipped at the camera's "
            f"{'maximum' if high >= low else 'minimum'}; clipped pixels give wrong maps — "
            "lower the light or exposure (or raise the offset) and acquire again"
        )


def check_dark(offset: np.ndarray, variance: np.ndarray, name: str) -> None:
    """Refuse a dark series whose brighter pixels are also noisier: light reaching the sensor."""
    typical = variance < HOT_FACTOR * np.median(variance)
    correlation = np.corrcoef(offset[typical], variance[typical])[0, 1]
    if correlation > LEAK_CORRELATION:
        raise UserError(
            f"{name}: in the dark series, brighter pixels are noisier (correlation "
            f"{correlation:.2f}): light reaches the sensor. Cap the camera or close the light "
            "path, switch off room lights and screens, and acquire the dark series again"
        )


def calibrate_camera(
    dark: Acquisition, flats: list[Acquisition], camera: str = ""
) -> CameraCalibration:
    """Maps from a dark series and flat-field series (module docstring), after the checks."""
    warnings: list[str] = []
    check_series(dark, "dark series", warnings)
    if len(flats) < MIN_LEVELS:
        raise UserError(
            f"{len(flats)} flat-field series; the gain needs at least {MIN_LEVELS} light levels "
            "(3–5 recommended, from about 10 % to 70 % of the camera's range)"
        )
    shapes = {a.frames.shape[1:] for a in [dark, *flats]}
    if len(shapes) > 1:
        raise UserError(f"the dark and flat series differ in frame shape ({sorted(shapes)})")
    offset, variance = temporal_moments(dark)
    check_dark(offset, variance, dark.name)
    numerator = np.zeros_like(offset)
    denominator = np.zeros_like(offset)
    transfer = []
    for flat in flats:
        check_series(flat, "flat-field series", warnings)
        mean, flat_variance = temporal_moments(flat)
        signal, shot = mean - offset, flat_variance - variance
        # The level's typical variance, not each pixel's noisy one (which would bias the slope low).
        weight = len(flat.frames) / max(float(np.median(flat_variance)), 1e-6) ** 2
        numerator += weight * signal * shot
        denominator += weight * signal**2
        transfer.append((float(np.median(signal)), float(np.median(shot))))
    rough_gain = np.median(numerator / np.maximum(denominator, 1e-12))
    for flat, (signal, _) in zip(flats, transfer, strict=True):
        if signal < MIN_FLAT_ELECTRONS * rough_gain:
            raise UserError(
                f"{flat.name}: only {signal / rough_gain:.0f} photo-electrons above the dark; "
                f"every flat level needs at least {MIN_FLAT_ELECTRONS:.0f} — raise the light"
            )
    if len({round(s / rough_gain / MIN_FLAT_ELECTRONS) for s, _ in transfer}) < MIN_LEVELS:
        raise UserError(
            "the flat-field series are all at about one light level; acquire them at several "
            "levels (e.g. 10 %, 30 %, 50 %, 70 % of the camera's range)"
        )
    gain = numerator / np.maximum(denominator, 1e-12)
    bad = ~(gain > 0.1 * rough_gain)
    if bad.any():
        warnings.append(f"{int(bad.sum())} pixel(s) without a usable gain get the median gain")
        gain[bad] = rough_gain
    maps = CameraMaps(offset, gain, variance)
    hot = maps.hot_pixels()
    summary = {
        "camera": camera,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "dark": dark.name,
        "flats": [f.name for f in flats],
        "frames": {a.name: len(a.frames) for a in [dark, *flats]},
        "shape": list(maps.shape),
        "offset_median": round(maps.reference[0], 4),
        "gain_median": round(maps.reference[1], 5),
        "variance_median": round(float(np.median(variance)), 4),
        "hot_pixels": int(hot.sum()),
        "hot_factor": HOT_FACTOR,
        "levels_electrons": [round(s / maps.reference[1], 1) for s, _ in transfer],
    }
    maps.metadata.update(summary)
    for message in warnings:
        log.warning(message)
    return CameraCalibration(maps, transfer, summary, warnings)


def maps_from_arrays(
    offset: np.ndarray, gain: np.ndarray, variance: np.ndarray | None, warnings: list[str]
) -> CameraMaps:
    """Maps from a user's (H, W) arrays; pixels whose gain is not positive get the median gain
    (with a warning), a missing variance map the dark level's median (one value for all)."""
    offset, gain = np.asarray(offset, np.float64), np.asarray(gain, np.float64)
    if offset.shape != gain.shape or (variance is not None and np.shape(variance) != gain.shape):
        found = [np.shape(m) for m in (offset, gain, variance) if m is not None]
        raise UserError(f"the map files differ in shape ({found}); give maps of one region")
    bad = ~(gain > 0)
    if bad.any():
        positions = ", ".join(map(str, np.argwhere(bad)[:5].tolist()))
        warnings.append(
            f"the gain map has {int(bad.sum())} pixel(s) ≤ 0 (e.g. at {positions}); they get the "
            "median gain"
        )
        gain = np.where(bad, np.median(gain[~bad]), gain)
    if variance is None:
        warnings.append(
            "no variance map: every pixel gets the same read noise, so hot pixels are not "
            "recognised — calibrate with --dark for a per-pixel variance map"
        )
        variance = np.zeros_like(gain)
    try:
        return CameraMaps(offset, gain, variance, metadata={"source": "map files"})
    except ValueError as error:
        raise UserError(f"camera maps: {error}") from None


def fit_check(
    maps: CameraMaps,
    frames: np.ndarray,
    name: str,
    fitted_gain: float | None,
    read_variance: float | None = None,
) -> dict[str, float]:
    """How well maps fit raw frames (T, H, W) of their region: the share of values more than
    BELOW_OFFSET_SIGMAS read-noise σ below the offset map (offset map too high; read noise alone
    puts at most Φ(−BELOW_OFFSET_SIGMAS) ≈ 0.13 % there, at pixels without light), the share
    below the map at all, and the map's median gain against the photon-transfer slope
    `fitted_gain` of the equalised frames (a normalised or relative gain map). σ is the variance
    map's, or √`read_variance` (ADU², e.g. the data's own read noise) where the map holds none.
    Returns the numbers; warnings go to the log and into `maps.metadata["fit_check"]`."""
    variance = maps.variance
    if read_variance is not None and not np.any(variance > 0):  # map files without variance
        variance = np.full_like(variance, read_variance)
    sigma = np.sqrt(np.maximum(variance, 1.0))
    below = float(np.mean(frames < maps.offset - BELOW_OFFSET_SIGMAS * sigma))
    below_map = float(np.mean(frames < maps.offset))
    darkest = float(np.percentile(frames.mean(0), 1)) - float(np.median(maps.offset))
    check = {
        "share_below_offset": round(below, 6),
        "share_below_offset_map": round(below_map, 6),
        "read_noise_allows": round(READ_NOISE_TAIL, 6),
        "darkest_level_above_offset": round(darkest, 3),
    }
    messages = []
    if below > BELOW_OFFSET_SHARE:
        messages.append(
            f"{name}: the camera maps do not fit the data: {below:.2%} of the raw values lie "
            f"more than {BELOW_OFFSET_SIGMAS:g} σ of read noise below the offset map, where read "
            f"noise explains at most {READ_NOISE_TAIL:.2%} ({below / READ_NOISE_TAIL:.0f}× more; "
            f"{below_map:.1%} lie below the map at all, and the darkest 1 % of pixels average "
            f"{darkest:+.1f} ADU from its median): the offset map is too high for this camera "
            "setting (other exposure, readout mode, temperature, or another camera) — give maps "
            "of this setting, or calibrate them with --dark and --flat"
        )
    if fitted_gain is not None:
        check["photon_transfer_gain"] = round(fitted_gain, 5)
        check["map_gain"] = round(maps.reference[1], 5)
        if abs(fitted_gain / maps.reference[1] - 1) > GAIN_AGREEMENT:
            messages.append(
                f"{name}: the data's photon-transfer slope is {fitted_gain:.3g} ADU/e⁻, the gain "
                f"map's median {maps.reference[1]:.3g}: the gain map looks relative or "
                "normalised; the noise model takes the shot noise from the data"
            )
    for message in messages:
        log.warning(message)
    maps.metadata["fit_check"] = {**check, "warnings": messages}
    return check
