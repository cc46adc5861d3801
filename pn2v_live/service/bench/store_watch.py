"""What a bench reads from the store and registry a running daemon writes: the ground truth each
replayed frame is scored against (`Reference`), the denoised twins as they come (`TwinWatcher`,
each observation a `Twin`) and the promoted model versions (`ModelWatcher`).

The store is only read while the daemon writes it: the ledger (SQLite in WAL mode: the `denoised`
table says which model version and window made each twin) and the denoised array, reopened at
every poll because it grows; the registry's `v*.json` files and `current` pointer as plain files
(a `ModelRegistry` object would sweep the daemon's half-written temporary files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pn2v_live.core.metrics import psnr
from pn2v_live.service.bench.quality import drift_corrected


class Reference:
    """The ground truth of every replayed frame, plain and drift-corrected, and the raw frames'
    own scores against both (computed once per frame)."""

    def __init__(self, raw: np.ndarray, truth: np.ndarray, data_range: float):
        """`raw` (T, Y, X) as sent; `truth` (Y, X) for all frames or (T, Y, X)."""
        self.raw, self.truth, self.data_range = raw, truth, data_range
        self._corrected: dict[int, np.ndarray] = {}
        self._raw_scores: dict[int, tuple[float, float]] = {}

    def truth_of(self, t: int) -> np.ndarray:
        """(Y, X) ground truth of frame t."""
        return self.truth if self.truth.ndim == 2 else self.truth[t]

    def corrected_of(self, t: int) -> np.ndarray:
        """(Y, X) ground truth of frame t fitted (gain, offset) to the raw frame's brightness."""
        if t not in self._corrected:
            self._corrected[t] = drift_corrected(self.raw[t].astype(np.float32), self.truth_of(t))
        return self._corrected[t]

    def scores(self, t: int, image: np.ndarray) -> tuple[float, float]:
        """PSNR (dB) of a (Y, X) `image` of frame t: against the truth, and drift-corrected."""
        return (
            psnr(image, self.truth_of(t), self.data_range),
            psnr(image, self.corrected_of(t), self.data_range),
        )

    def raw_scores(self, t: int) -> tuple[float, float]:
        """`scores` of raw frame t."""
        if t not in self._raw_scores:
            self._raw_scores[t] = self.scores(t, self.raw[t])
        return self._raw_scores[t]


@dataclass(frozen=True)
class Twin:
    """One observation of denoised frame `frame`: when (s after the first frame sent), which
    model version and window made it, and its scores (dB)."""

    t_s: float
    frame: int
    version: int
    window: str
    psnr_db: float
    raw_psnr_db: float
    psnr_drift_corrected_db: float
    raw_psnr_drift_corrected_db: float

    @property
    def gain_db(self) -> float:
        return self.psnr_db - self.raw_psnr_db

    @property
    def gain_drift_corrected_db(self) -> float:
        return self.psnr_drift_corrected_db - self.raw_psnr_drift_corrected_db

    def line(self) -> dict[str, Any]:
        """The progress line's fields."""
        return {
            "t_s": round(self.t_s, 2),
            "frame": self.frame,
            "version": self.version,
            "window": self.window,
            "psnr_db": round(self.psnr_db, 4),
            "raw_psnr_db": round(self.raw_psnr_db, 4),
            "gain_db": round(self.gain_db, 4),
            "gain_drift_corrected_db": round(self.gain_drift_corrected_db, 4),
        }


class TwinWatcher:
    """Reads the twins of `acquisition` under the store `root` that are new or were replaced
    since the last `poll` (ledger row, then chunk), and scores them."""

    def __init__(self, root: Path, reference: Reference, acquisition: str):
        from pn2v_live.storage.store import Store

        self.root, self.reference, self.acquisition = root, reference, acquisition
        self.store = Store(root)  # a reader beside the daemon, which writes it
        self.seen: dict[int, tuple[int, str]] = {}  # frame → (version, window) last scored
        self.latest: dict[int, Twin] = {}

    def close(self) -> None:
        self.store.close()

    def poll(self, t_s: float) -> list[Twin]:
        """The twins new or changed since the last poll, observed at `t_s`."""
        import zarr

        from pn2v_live.storage.layout import SUFFIX

        twins = self.store.recorded_twins(self.acquisition)
        changed = {t: made for t, made in twins.items() if self.seen.get(t) != made}
        if not changed:
            return []
        array = zarr.open_array(
            self.root / (self.acquisition + SUFFIX) / "denoised" / "0", mode="r"
        )
        observed = []
        for t, (version, window) in sorted(changed.items()):
            if t >= len(self.reference.raw):
                continue  # not a frame this bench sent
            twin_scores = self.reference.scores(t, np.asarray(array[t, 0, 0]))
            raw_scores = self.reference.raw_scores(t)
            twin = Twin(t_s, t, version, window, twin_scores[0], raw_scores[0],
                        twin_scores[1], raw_scores[1])  # fmt: skip
            self.seen[t], self.latest[t] = (version, window), twin
            observed.append(twin)
        return observed

    def frames_stored(self) -> int:
        return len(self.store.recorded_frames(self.acquisition))


class ModelWatcher:
    """Remembers the metadata of every model version the registry folder held at any poll (a
    promotion prunes old versions) and reports promotions."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.infos: dict[int, dict[str, Any]] = {}
        self.current: int | None = None

    def poll(self) -> int | None:
        """The newly promoted version since the last poll, or None."""
        from pn2v_live.storage.registry import POINTER

        for path in sorted(self.folder.glob("v[0-9]*.json")):
            version = int(path.name[1:].split(".")[0])
            if version not in self.infos:
                try:
                    self.infos[version] = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue  # pruned meanwhile (files are written whole, then renamed)
        try:
            current = int((self.folder / POINTER).read_text().strip())
        except (OSError, ValueError):
            return None
        if current == self.current or current not in self.infos:
            return None
        self.current = current
        return current

    def training_steps(self, version: int) -> int | None:
        """Optimiser steps behind `version`: its `training_steps` and those of its parents.
        None when a parent's metadata was never seen."""
        steps = 0
        while version is not None:
            info = self.infos.get(version)
            if info is None:
                return None
            steps += int(info["training_steps"])
            version = info["parent"]
        return steps
