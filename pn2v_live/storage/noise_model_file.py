"""Noise-model files: one torch file per model, holding its state and metadata.

Layout (read with `torch.load(path, weights_only=True)`, plain dicts, lists, numbers, strings and
tensors only):

    {"format": "pn2v-live noise model", "version": 1,
     "state": {"kind": "hybrid" | "histogram" | "gmm" | "poisson-gaussian", ...tensors...,
               "signal_range": [min, max], "metadata": {...}}}

Written atomically (temporary file in the same folder, then rename), so a reader never sees a
half-written model.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from pn2v_live.core.noise import NoiseModel, noise_model_from_state
from pn2v_live.errors import UserError
from pn2v_live.storage.atomic import write_atomically
from pn2v_live.storage.file_format import check_format

FORMAT = "pn2v-live noise model"
VERSION = 1


def save_noise_model(model: NoiseModel, path: str | Path) -> Path:
    """Write `model` (state + metadata) to `path` atomically; returns the path."""
    content = encoded(model)
    return write_atomically(path, lambda file: file.write(content))


def encoded(model: NoiseModel) -> bytes:
    """The bytes of `model`'s file (what `save_noise_model` writes)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "state": model.state()}, buffer)
    return buffer.getvalue()


def load_noise_model(path: str | Path, device: torch.device | str = "cpu") -> NoiseModel:
    """Read a noise model written by `save_noise_model`; UserError says why a file is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such noise-model file (create one with `pn2v-live calibrate`)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise UserError(
            f"{path}: not a readable noise-model file ({error}); recreate it with "
            "`pn2v-live calibrate`"
        ) from error
    check_format(path, content, FORMAT, VERSION, "noise-model", "; recalibrate")
    try:
        model = noise_model_from_state(content["state"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: damaged noise-model file ({error}); recalibrate") from error
    return model.to(device)
