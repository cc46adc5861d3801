"""Refined noise-model versions in the store: `<store root>/noise-models/<id>.pt` + `<id>.json`.

The id is the file's content id (`registry.content_id`: the first 16 hex digits of its SHA-256),
the same id model versions record as `noise_model_id`. Each file is written atomically, model
first, then its JSON sidecar (id, kind, signal range and the `refinement` record: parent, root,
generation, created, acquisitions, frames, pairs, signal ranges), so a crash leaves at most a
model without a sidecar, which is ignored. `newest(root)` is the version a restart continues
with: the latest generation refined from the calibration file with id `root`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pn2v_live.core.noise import NoiseModel
from pn2v_live.errors import UserError
from pn2v_live.storage.atomic import write_atomically
from pn2v_live.storage.noise_model_file import encoded, load_noise_model

log = logging.getLogger(__name__)

FOLDER = "noise-models"


@dataclass(frozen=True)
class NoiseModelVersion:
    """One stored version: its id, model file and `refinement` record (see the module doc)."""

    id: str
    path: Path
    refinement: dict[str, Any]

    @property
    def generation(self) -> int:
        return int(self.refinement.get("generation", 0))


class NoiseModelVersions:
    """The refined noise models of one store root (folder created on the first save)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def save(self, model: NoiseModel) -> NoiseModelVersion:
        """Write `model` (its metadata["refinement"] says what it was refined from) and its
        sidecar; returns the version, whose id is the model file's content id."""
        content = encoded(model)
        model_id = hashlib.sha256(content).hexdigest()[:16]  # = registry.content_id(path)
        path = write_atomically(self.folder / f"{model_id}.pt", lambda file: file.write(content))
        refinement = dict(model.metadata.get("refinement", {}))
        sidecar = {
            "id": model_id,
            "kind": model.kind,
            "signal_range": list(model.signal_range),
            "refinement": refinement,
        }
        text = json.dumps(sidecar, indent=1).encode()
        write_atomically(path.with_suffix(".json"), lambda file: file.write(text))
        return NoiseModelVersion(model_id, path, refinement)

    def versions(self, root: str | None = None) -> list[NoiseModelVersion]:
        """Every complete version (model and sidecar), oldest generation first; only those
        refined from the calibration with id `root` when given."""
        found = []
        for sidecar in self.folder.glob("*.json"):
            try:
                record = json.loads(sidecar.read_text())
                version = NoiseModelVersion(
                    record["id"], sidecar.with_suffix(".pt"), record["refinement"]
                )
            except (OSError, ValueError, KeyError, TypeError) as error:
                log.warning("%s: unreadable noise-model sidecar, ignored (%s)", sidecar, error)
                continue
            if version.path.is_file() and (root is None or version.refinement.get("root") == root):
                found.append(version)
        return sorted(found, key=lambda v: (v.generation, str(v.refinement.get("created", ""))))

    def newest(
        self, root: str, device: torch.device | str = "cpu"
    ) -> tuple[NoiseModelVersion, NoiseModel] | None:
        """The newest version refined from calibration `root` that loads and whose content
        matches its id (a damaged one is skipped with a warning), with its model; None if none."""
        for version in reversed(self.versions(root)):
            try:
                if hashlib.sha256(version.path.read_bytes()).hexdigest()[:16] != version.id:
                    raise UserError(f"{version.path}: content does not match its id")
                return version, load_noise_model(version.path, device)
            except (OSError, UserError) as error:
                log.warning("refined noise model %s skipped: %s", version.id, error)
        return None
