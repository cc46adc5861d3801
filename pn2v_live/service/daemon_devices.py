"""Where the daemon's inference and training run: the configured devices resolved, described for
the log and /api/status, and exported as `pn2v_live_build_info`."""

from __future__ import annotations

import logging

import torch

from pn2v_live import __version__
from pn2v_live.core.device import (
    describe_device,
    device_name,
    precision_name,
    resolve_device,
    torch_build,
    unusable_gpu_warning,
)
from pn2v_live.core.model import PRECISIONS
from pn2v_live.service.config import Config
from pn2v_live.telemetry import BUILD_INFO

log = logging.getLogger("pn2v_live.daemon")


def daemon_devices(c: Config) -> tuple[torch.device, torch.device, dict[str, str | None]]:
    """The inference and trainer devices (a UserError when one is not on this machine), and
    what runs where: "inference" and "training" ("cuda:0 (NVIDIA H200), bfloat16"), "torch"
    (its version and build) and "warning" (an NVIDIA GPU torch cannot use, or None)."""
    inference = resolve_device(c.inference.device, "inference.device")
    trainer = (  # the same setting twice: one resolution, one warning
        inference
        if c.trainer.device == c.inference.device
        else resolve_device(c.trainer.device, "trainer.device")
    )
    inference_bf16 = PRECISIONS[c.inference.precision]
    where = "" if c.inference.scheduler == "local" else f" (dask at {c.inference.scheduler})"
    auto_on_cpu = any(
        setting == "auto" and device.type == "cpu"
        for setting, device in ((c.inference.device, inference), (c.trainer.device, trainer))
    )
    devices = {
        "inference": describe_device(inference, inference_bf16) + where,
        "training": describe_device(trainer, PRECISIONS[c.trainer.precision]),
        "torch": torch_build(),
        "warning": unusable_gpu_warning() if auto_on_cpu else None,
    }
    log.info(
        "inference on %s; training on %s; %s",
        devices["inference"],
        devices["training"],
        devices["torch"],
    )
    BUILD_INFO.info(
        {
            "version": __version__,
            "torch": devices["torch"].removeprefix("torch "),
            "device": device_name(inference) + where,
            "precision": precision_name(inference, inference_bf16),
        }
    )
    return inference, trainer, devices
