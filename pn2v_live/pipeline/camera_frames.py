"""sCMOS camera maps in the daemon: the sensor region an acquisition's frames cover, and those
frames as a camera-maps noise model reads them (`core.camera`: equalised, with each pixel's
read-noise variance).

An acquisition's frames lie at the sensor origin their source gave (the ZeroMQ header's
`sensor_origin`, kept with the acquisition), else at the configured `camera.sensor_origin`.
Frames the maps do not cover are refused at ingest (`admit`, reason "camera_maps"), so the
trainer and inference see only frames the maps cover.
"""

from __future__ import annotations

import numpy as np

from pn2v_live.core.camera import CameraMaps
from pn2v_live.core.noise import CameraNoiseModel, NoiseModel
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.rejected import Rejected


class CameraFrames:
    """The camera maps of `noise_model` (none: frames pass unchanged), placing frames whose
    source gave no sensor origin at `default_origin` (row, column)."""

    def __init__(self, noise_model: NoiseModel, default_origin: tuple[int, int] = (0, 0)):
        self.maps: CameraMaps | None = (
            noise_model.maps if isinstance(noise_model, CameraNoiseModel) else None
        )
        # what the registry records with each model trained on these frames (None: no maps)
        self.maps_id: str | None = None if self.maps is None else self.maps.content_id()
        self.default_origin = (int(default_origin[0]), int(default_origin[1]))

    def origin(self, acquisition: Acquisition) -> tuple[int, int]:
        """The sensor position (row, column) of `acquisition`'s pixel [0, 0]."""
        return acquisition.sensor_origin or self.default_origin

    def admit(self, shape: tuple[int, ...], origin: tuple[int, int] | None) -> None:
        """Rejected("camera_maps") when (…, Y, X) frames at `origin` (None: the default) reach
        beyond the maps; a `rejected.FrameCheck`."""
        if self.maps is None:
            return
        try:
            self.maps.region(origin or self.default_origin, tuple(shape[-2:]))
        except ValueError as error:
            raise Rejected("camera_maps", f"camera maps: {error}") from None

    def inputs(
        self, acquisition: Acquisition, frames: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw frames (…, Y, X) of `acquisition` → equalised float32 frames and their (Y, X)
        read-noise variance in reference ADU² (`CameraNoiseModel.camera_inputs`); without maps
        the frames unchanged and None. ValueError when the frames reach beyond the maps."""
        if self.maps is None:
            return frames, None
        region = self.maps.region(self.origin(acquisition), np.shape(frames)[-2:])
        return region.equalise(frames), region.pixel_variance()
