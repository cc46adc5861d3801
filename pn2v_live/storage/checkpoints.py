"""Denoiser checkpoint files: weights, mode, K, normalisation, training history and metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pn2v_live.core.context import Context
from pn2v_live.core.model import Denoiser, new_denoiser
from pn2v_live.errors import UserError
from pn2v_live.storage.atomic import write_atomically

FORMAT = "pn2v-live denoiser 1"


def save_denoiser(
    denoiser: Denoiser, path: str | Path, metadata: dict[str, Any] | None = None
) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old file or the new one."""
    net = denoiser.net
    state = {
        "format": FORMAT,
        "mode": denoiser.mode,
        "k": denoiser.k,
        "depth": net.depth,
        "features": net.features,
        "context": [denoiser.context.before, denoiser.context.after],
        "residual": denoiser.residual,
        "mean": denoiser.mean,
        "std": denoiser.std,
        "weights": {name: t.detach().cpu() for name, t in net.state_dict().items()},
        "history": denoiser.history,
        "metadata": dict(metadata or {}),
    }
    write_atomically(path, lambda file: torch.save(state, file))


def load_denoiser(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict]:
    """Read a checkpoint written by `save_denoiser`; returns the denoiser and its metadata."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found") from None
    except Exception as error:
        raise UserError(f"{path}: not a pn2v-live model file ({error})") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a pn2v-live model file")
    before, after = state.get("context", (0, 0))  # files from before temporal context: 0:0
    denoiser = new_denoiser(
        state["mode"], state["mean"], state["std"], state["k"], state["depth"], state["features"],
        Context(before, after), state.get("residual", False),  # older files: not residual
    )  # fmt: skip
    denoiser.net.load_state_dict(state["weights"])
    denoiser.net.to(device)
    denoiser.history = list(state["history"])
    return denoiser, state["metadata"]
