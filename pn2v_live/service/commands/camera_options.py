"""The sCMOS camera-maps options of `train` and `denoise`, and what they do to the inputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from pn2v_live.errors import UserError

if TYPE_CHECKING:
    from pn2v_live.core.noise import NoiseModel

CameraMapsOption = Annotated[
    Path | None,
    typer.Option(
        "--camera-maps",
        help="sCMOS per-pixel offset/gain/read-noise maps (from `calibrate --dark ... "
        "--maps-output`); default: those stored in the noise model, if any",
    ),
]
SensorOriginOption = Annotated[
    str,
    typer.Option(
        "--sensor-origin",
        help="ROW,COL: the sensor position of the images' pixel [0, 0] (a crop or ROI); picks the "
        "camera maps' region",
    ),
]


def parse_origin(text: str) -> tuple[int, int]:
    """ "ROW,COL" → (row, column), both ≥ 0."""
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if match is None:
        raise UserError(f"--sensor-origin must look like ROW,COL (e.g. 0,512), not {text!r}")
    return int(match[1]), int(match[2])


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
    noise_model: NoiseModel | None, series: list[np.ndarray], origin: tuple[int, int]
) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """(T, Y, X) raw stacks as the noise model reads them (equalised with camera maps), and with
    maps each stack's read-noise variance map (Y, X), else None; UserError when a stack lies
    beyond the maps."""
    if noise_model is None:
        return [np.asarray(s, np.float32) for s in series], None
    inputs = []
    for stack in series:
        try:
            inputs.append(noise_model.camera_inputs(stack, origin))
        except ValueError as error:
            raise UserError(f"camera maps: {error}") from None
    frames = [frames for frames, _ in inputs]
    variances = [variance for _, variance in inputs]
    return frames, None if variances[0] is None else variances
