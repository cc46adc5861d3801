"""The sCMOS camera of `pn2v-live demo --camera scmos`: a synthetic sensor with known per-pixel
offset, gain and read-noise maps (hot pixels included, `core.synthetic_scmos`), whose maps the
demo calibrates from simulated dark and flat-field series, as `calibrate --dark --flat` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps

DARK_FRAMES = 200  # the dark series (camera capped), as calibration/scmos.md advises
FLAT_FRAMES = 200  # each flat-field series ...
FLAT_ELECTRONS = (40.0, 120.0, 360.0)  # ... at these light levels (photo-electrons per pixel)


def scmos_camera(size: int, seed: int) -> ScmosCamera:
    """A `size`² synthetic sCMOS sensor (0.5 % hot pixels with 10× the read-noise variance)."""
    return ScmosCamera(scmos_maps((size, size), seed=seed))


def calibrate_scmos(path: Path, camera: ScmosCamera) -> Path:
    """Calibrate `camera`'s maps from simulated dark and flat series and save the per-pixel
    noise model (the maps' Poisson–Gaussian, maps inside) at `path` and the maps beside it
    (`<stem>.camera.tif`); prints how close the maps came to the camera's. Returns the maps
    file."""
    from pn2v_live.calibration.camera_maps import calibrate_camera
    from pn2v_live.calibration.workflow import Acquisition
    from pn2v_live.core.noise import CameraNoiseModel
    from pn2v_live.storage.camera_maps_file import save_camera_maps
    from pn2v_live.storage.noise_model_file import save_noise_model

    print(
        f"calibrating the sCMOS camera maps from {DARK_FRAMES} simulated dark frames and "
        f"{len(FLAT_ELECTRONS)} flat-field levels of {FLAT_FRAMES} frames"
    )
    dark = Acquisition("dark", camera.series(0.0, DARK_FRAMES, seed=1))
    flats = [
        Acquisition(f"flat {level:g} e-", camera.series(level, FLAT_FRAMES, seed=2 + i))
        for i, level in enumerate(FLAT_ELECTRONS)
    ]
    maps = calibrate_camera(dark, flats, "demo sCMOS").maps
    truth = camera.maps
    hot, found = truth.hot_pixels(), maps.hot_pixels()
    print(
        f"camera maps: offset off by {np.median(np.abs(maps.offset - truth.offset)):.2f} ADU, "
        f"gain by {100 * np.median(np.abs(maps.gain / truth.gain - 1)):.1f} %, read-noise "
        f"variance by {100 * np.median(np.abs(maps.variance / truth.variance - 1)):.1f} % "
        f"(medians); {int(found.sum())} hot pixels flagged, {int((found & hot).sum())} of the "
        f"camera's {int(hot.sum())}"
    )
    offset, gain = maps.reference
    maps_path = path.with_name(f"{path.stem}.camera.tif")
    save_camera_maps(maps, maps_path)
    model = CameraNoiseModel.from_maps(maps, (offset, offset + gain * max(FLAT_ELECTRONS)))
    model.metadata["camera_maps"] = str(maps_path)
    save_noise_model(model, path)
    return maps_path


def fixed_pattern(denoised: np.ndarray, raw: np.ndarray, offset: np.ndarray) -> str:
    """The correlation of the raw and the denoised frame with the camera's offset map (the
    fixed-pattern residual), as words."""
    raw_r, denoised_r = (
        float(np.corrcoef(np.asarray(image, np.float64).ravel(), offset.ravel())[0, 1])
        for image in (raw, denoised)
    )
    return f"correlation with the offset map: raw {raw_r:.2f}, denoised {denoised_r:.2f}"
