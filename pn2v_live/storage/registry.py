"""Model registry: numbered checkpoints with metadata and a `current` pointer, crash-safe.

Layout of the registry folder (usually `<store root>/models/`):

    v0003.pt      checkpoint (storage/checkpoints.py format, metadata embedded)
    v0003.json    the same metadata, for listing without loading weights
    current       the promoted version number, e.g. "3"

Every file is written to a temporary name, fsynced, renamed over the final name and the folder
fsynced (`atomic.write_atomically`): checkpoint, then metadata, then the pointer, each on disk
before the next is written. After a SIGKILL or power cut the pointer names a complete
checkpoint, and a half-written newer version is never used (its number is simply skipped).

With `keep_versions`, each promotion then deletes every version but the current one and the newest
`keep_versions`: every doomed `.json` first, a folder fsync, then their `.pt` files. A crash
in between leaves checkpoints without metadata, which `versions()` does not list and the next
promotion deletes. The newest number always survives, so numbers are never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pn2v_live.core.model import Denoiser
from pn2v_live.storage.atomic import make_folders, sync_folder, write_atomically
from pn2v_live.storage.checkpoints import load_denoiser, save_denoiser

log = logging.getLogger(__name__)

POINTER = "current"


@dataclass(frozen=True)
class ModelInfo:
    """What the registry records about one model version."""

    version: int
    parent: int | None
    created: str  # ISO 8601, UTC
    training_frames: int  # raw frames available to the round that produced it
    training_steps: int  # optimiser steps since the parent (total for the first version)
    validation_loss: float | None  # Eq. 7 loss on held-back frames, None when not measured
    noise_model_id: str | None  # content_id() of the noise model file it was trained with
    source: str = "trained"  # "trained", or the path of an imported initial checkpoint
    # Ground-truth-free PSNR gain over raw on held-back frames (core.quality) and its standard
    # error, dB; None for imported models and versions written before it was measured.
    estimated_gain_db: float | None = None
    estimated_gain_uncertainty_db: float | None = None
    # `CameraMaps.content_id` of the sCMOS camera maps its frames were equalised with; None:
    # trained without maps (and every version written before it was recorded).
    camera_maps_id: str | None = None


class ModelRegistry:
    """Versions in `folder`; `promote` adds a version only when it beats the current one.

    With `keep_versions` (None: keep all), a promotion deletes every version but the newest
    `keep_versions` and the current one.
    """

    def __init__(self, folder: Path, keep_versions: int | None = None):
        if keep_versions is not None and keep_versions < 1:
            raise ValueError(f"keep_versions must be at least 1, got {keep_versions}")
        self.folder = Path(folder)
        self.keep_versions = keep_versions
        make_folders(self.folder)  # durably: a promoted version must not lose its folder
        self._lock = threading.Lock()
        for leftover in self.folder.glob(".*"):  # temporary files of a writer that was killed
            leftover.unlink()

    def current(self) -> ModelInfo | None:
        """The promoted version's metadata, or None before the first promotion."""
        pointer = self.folder / POINTER
        if not pointer.exists():
            return None
        return self.info(int(pointer.read_text().strip()))

    def info(self, version: int) -> ModelInfo:
        return ModelInfo(**json.loads(self._path(version, ".json").read_text()))

    def versions(self) -> list[ModelInfo]:
        """Every completely written version, oldest first (promoted or not yet pointed to)."""
        numbers = sorted(int(p.stem[1:]) for p in self.folder.glob("v*.json"))
        return [self.info(n) for n in numbers]

    def load(self, version: int | None = None) -> tuple[Denoiser, ModelInfo]:
        """The denoiser of `version` (default: the current one) on the CPU, with its metadata."""
        info = self.current() if version is None else self.info(version)
        if info is None:
            raise LookupError(f"{self.folder}: no model promoted yet")
        denoiser, _ = load_denoiser(self._path(info.version, ".pt"))
        return denoiser, info

    def promote(
        self,
        denoiser: Denoiser,
        *,
        validation_loss: float | None,
        training_frames: int,
        training_steps: int,
        noise_model_id: str | None,
        baseline_loss: float | None = None,
        source: str = "trained",
        estimated_gain_db: float | None = None,
        estimated_gain_uncertainty_db: float | None = None,
        camera_maps_id: str | None = None,
    ) -> ModelInfo | None:
        """Store `denoiser` as the next version and point `current` at it, if it is better.

        Better means: there is no current model, or `validation_loss` is finite and below
        `baseline_loss` (the current model's loss on the same validation batch; defaults to the
        loss recorded at its promotion). `validation_loss=None` is only accepted as the first
        version (an imported initial model). Returns the new metadata, or None if not promoted.
        """
        with self._lock:
            current = self.current()
            if current is not None:
                baseline = current.validation_loss if baseline_loss is None else baseline_loss
                if validation_loss is None or not math.isfinite(validation_loss):
                    return None
                comparable = baseline is not None and not math.isnan(baseline)
                if comparable and not validation_loss < baseline:
                    return None
            elif validation_loss is not None and not math.isfinite(validation_loss):
                return None
            info = ModelInfo(
                version=self._next_version(),
                parent=None if current is None else current.version,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
                training_frames=training_frames,
                training_steps=training_steps,
                validation_loss=validation_loss,
                noise_model_id=noise_model_id,
                source=source,
                estimated_gain_db=estimated_gain_db,
                estimated_gain_uncertainty_db=estimated_gain_uncertainty_db,
                camera_maps_id=camera_maps_id,
            )
            save_denoiser(denoiser, self._path(info.version, ".pt"), asdict(info))  # atomic
            write_atomically(self._path(info.version, ".json"), _writer(json.dumps(asdict(info))))
            write_atomically(self.folder / POINTER, _writer(f"{info.version}\n"))
            if self.keep_versions is not None:
                self._prune(info.version)
            return info

    def _prune(self, current: int) -> None:
        """Delete the files of every version but `current` and the newest `keep_versions`
        complete ones (metadata first; see the module docstring). Failures are only logged."""
        complete = sorted(map(_number, self.folder.glob("v[0-9]*.json")))
        keep = {current, *complete[-self.keep_versions :]}
        doomed = [p for p in self.folder.glob("v[0-9]*") if _number(p) not in keep]
        try:
            for path in doomed:
                if path.suffix == ".json":
                    path.unlink(missing_ok=True)
            sync_folder(self.folder)
            for path in doomed:
                if path.suffix != ".json":
                    path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("%s: could not delete old model versions (%s)", self.folder, error)

    def _next_version(self) -> int:
        """One past every version number with any file, finished or not."""
        return max(map(_number, self.folder.glob("v[0-9]*")), default=0) + 1

    def _path(self, version: int, suffix: str) -> Path:
        return self.folder / f"v{version:04d}{suffix}"


def content_id(path: Path) -> str:
    """A short identifier of a file's content (first 16 hex digits of its SHA-256)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _number(path: Path) -> int:
    """The version number in a registry file name such as v0003.pt."""
    return int(path.name[1:].split(".")[0])


def _writer(text: str):
    """A `write_atomically` callback writing `text` as UTF-8."""
    return lambda file: file.write(text.encode())
