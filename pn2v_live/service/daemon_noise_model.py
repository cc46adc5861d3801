"""Which noise model the daemon starts with, and whether it refines it from the stream."""

from __future__ import annotations

import logging

from pn2v_live.core.noise import NoiseModel
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.service.config import NoiseModelConfig
from pn2v_live.storage.noise_model_versions import NoiseModelVersions

log = logging.getLogger("pn2v_live.daemon")


def refines(c: NoiseModelConfig, camera: CameraFrames) -> bool:
    """Whether the noise model is refined from the stream: `noise_model.refine`, and not with
    sCMOS camera maps (a refined model would lose them; logged)."""
    if c.refine and camera.maps is not None:
        log.info("noise_model.refine is not done with sCMOS camera maps; using %s as it is", c.path)
        return False
    return c.refine


def newest_noise_model(
    c: NoiseModelConfig,
    versions: NoiseModelVersions,
    calibrated: NoiseModel,
    calibrated_id: str,
    refine: bool,
) -> tuple[NoiseModel, str]:
    """The noise model to start with, and its id: the newest of `versions` refined from the
    configured file when `refine`, else that file's model (`calibrated`, `calibrated_id`)."""
    newest = versions.newest(calibrated_id) if refine else None
    if newest is None:
        if not c.refine and versions.versions(calibrated_id):
            log.info(
                "noise_model.refine is off: using %s as calibrated, not its refined versions in %s",
                c.path,
                versions.folder,
            )
        return calibrated, calibrated_id
    version, model = newest
    log.info(
        "using noise model %s, refined from %s (generation %d, signal range %.0f–%.0f ADU, "
        "calibrated %.0f–%.0f ADU); noise_model.refine = false uses %s alone",
        version.id,
        c.path,
        version.generation,
        *model.signal_range,
        *calibrated.signal_range,
        c.path,
    )
    return model, version.id
