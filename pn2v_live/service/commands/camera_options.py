"""The sCMOS camera-maps options of `train` and `denoise`, and what they do to the inputs."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import tifffile
import typer

from pn2v_live.errors import UserError

if TYPE_CHECKING:
    from pn2v_live.core.noise import NoiseModel

log = logging.getLogger("pn2v_live.cli")

CameraMapsOption = Annotated[
    Path | None,
    typer.Option(
        "--camera-maps",
        help="sCMOS per-pixel offset/gain/read-noise maps (from `calibrate --dark ... "
        "--maps-output`); default: those stored in the noise model, if any",
    ),
]
SensorOriginOption = Annotated[
    str | None,
    typer.Option(
        "--sensor-origin",
        help="ROW,COL: the sensor position of the images' pixel [0, 0] (a crop or ROI); picks the "
        "camera maps' region",
        show_default="the Micro-Manager ROI a TIFF carries, else 0,0",
    ),
]


def parse_origin(text: str | None, found: tuple[int, int] | None = None) -> tuple[int, int]:
    """ "ROW,COL" → (row, column), both ≥ 0; no text: `found` (the origin an image file
    carries, `tiff_metadata`), else (0, 0)."""
    if text is None:
        return found or (0, 0)
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None:
        raise UserError(f"--sensor-origin must look like ROW,COL (e.g. 0,512), not {text!r}")
    origin = int(match[1]), int(match[2])
    if found is not None and found != origin:
        log.warning("--sensor-origin %s,%s replaces the file's ROI origin %s,%s", *origin, *found)
    return origin


def sensor_origins(text: str | None, paths: list[Path]) -> list[tuple[int, int]]:
    """Each image's sensor origin (`parse_origin`): --sensor-origin, else the Micro-Manager ROI
    its TIFF (or its folder's first TIFF) carries, else (0, 0)."""
    from pn2v_live.storage.images import IMAGE_SUFFIXES
    from pn2v_live.storage.tiff_metadata import micromanager_origin

    origins = []
    for path in paths:
        found = None
        tiff = path
        if path.is_dir():
            tiff = min(
                (p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), default=None
            )
        if tiff is not None and tiff.suffix.lower() in (".tif", ".tiff"):
            try:
                with tifffile.TiffFile(tiff) as tif:
                    found = micromanager_origin(tif, tuple(tif.series[0].shape[-2:]))
            except (OSError, ValueError, IndexError):  # read_stack says what is wrong with it
                found = None
        origins.append(parse_origin(text, found))
    return origins


def with_camera_maps(noise_model: NoiseModel, maps_path: Path | None) -> NoiseModel:
    """`noise_model` made per-pixel by the maps at `maps_path` (replacing maps it carries);
    unchanged when no path is given."""
    from pn2v_live.core.noise import CameraNoiseModel
    from pn2v_live.storage.camera_maps_file import load_camera_maps

    if maps_path is None:
        return noise_model
    maps = load_camera_maps(maps_path)
    base = noise_model.base if isinstance(noise_model, CameraNoiseModel) else noise_model
    return CameraNoiseModel(base, maps, dict(noise_model.metadata, camera_maps=str(maps_path)))


def camera_series(
    noise_model: NoiseModel | None,
    series: list[np.ndarray],
    origin: tuple[int, int] | list[tuple[int, int]],
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """(T, Y, X) raw stacks as the noise model reads them (equalised with camera maps), and with
    maps each stack's read-noise variance map (Y, X), else None; `origin` is the stacks' sensor
    origin, or each one's. UserError when a stack lies beyond the maps."""
    if noise_model is None:
        return [np.asarray(s, np.float32) for s in series], None
    origins = origin if isinstance(origin, list) else [origin] * len(series)
    inputs = []
    for stack, origin in zip(series, origins, strict=True):
        try:
            inputs.append(noise_model.camera_inputs(stack, origin))
        except ValueError as error:
            raise UserError(f"camera maps: {error}") from None
    frames = [frames for frames, _ in inputs]
    variances = [variance for _, variance in inputs]
    return frames, None if variances[0] is None else variances


def camera_maps_id(noise_model: NoiseModel | None) -> str | None:
    """`CameraMaps.content_id` of the maps `noise_model` applies; None without maps."""
    maps = getattr(noise_model, "maps", None)
    return None if maps is None else maps.content_id()


def trained_maps_id(metadata: dict) -> str | None:
    """The id of the camera maps a model file's network was trained with: recorded by `train`
    (`camera_maps_id`), else those of the noise model stored in it; None: trained without."""
    if "camera_maps_id" in metadata:
        return metadata["camera_maps_id"]
    state = metadata.get("noise_model_state") or {}
    if state.get("kind") != "camera-maps":
        return None
    from pn2v_live.core.noise import noise_model_from_state

    return camera_maps_id(noise_model_from_state(state))


def warn_if_other_maps(metadata: dict, noise_model: NoiseModel | None, model: Path) -> str | None:
    """A WARNING (logged and returned) when `noise_model`'s camera maps are not those the model
    file `model` was trained with (`other_maps_warning`); None when they agree."""
    trained, given = trained_maps_id(metadata), camera_maps_id(noise_model)
    message = other_maps_warning(trained, given, str(model), "--camera-maps")
    if message is not None:
        log.warning(message)
    return message


def other_maps_warning(
    trained: str | None, given: str | None, model: str, setting: str
) -> str | None:
    """What to warn when the camera maps applied now (`given`, their id; None: none) are not those
    `model` was trained with (`trained`): its network learnt frames equalised with those maps (or
    raw ones), so other maps leave a fixed pattern or misplace hot pixels. `setting`: where maps
    are given (an option or config key). None when they agree."""
    if trained == given:
        return None
    if given is None:
        return (
            f"{model} was trained with camera maps {trained}, but none are applied now: the "
            "frames are not equalised as in training (a fixed-pattern residual, hot pixels taken "
            f"as signal) — give the noise model with those maps, or {setting}"
        )
    if trained is None:
        return (
            f"{model} was trained without camera maps, but maps {given} are applied now: the "
            "network sees equalised frames it was not trained on — retrain with the maps"
        )
    return (
        f"{model} was trained with camera maps {trained}, not with the maps {given} given "
        "now (another calibration or camera): give the maps it was trained with, or retrain"
    )
