"""Which noise model the daemon starts with, whether it refines it from the stream, and whether
the model it resumes from was trained with the camera maps it applies."""

from __future__ import annotations

import logging

from pn2v_live.core.noise import NoiseModel
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.service.commands.camera_options import other_maps_warning
from pn2v_live.service.config import NoiseModelConfig
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.registry import ModelRegistry

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


def warn_if_other_model_maps(registry: ModelRegistry, camera: CameraFrames) -> str | None:
    """A WARNING naming both ids (logged and returned; `denoise`'s wording, `other_maps_warning`)
    when the promoted model, which the daemon resumes from, was trained with other camera maps
    than `camera`'s, or with maps where none are applied now, or the reverse; None when they
    agree. The daemon goes on with it, as with another noise model: rounds fine-tune it on the
    frames as read now, and a version that beats it replaces it."""
    current = registry.current()
    if current is None:
        return None
    model = f"model version {current.version} ({registry.folder})"
    message = other_maps_warning(current.camera_maps_id, camera.maps_id, model, "camera.maps")
    if message is None:
        return None
    message += " (the daemon goes on with it; rounds fine-tune it on the frames as read now)"
    log.warning(message)
    return message
