"""Refining the noise model from the stream when its signal goes above the calibrated range.

When more than WARN_FRACTION of a denoised frame lies above the noise model's signal range, the
frame's (MMSE estimate = denoised twin, raw) pairs are gathered, as `calibrate --bootstrap` uses
(N2V prediction, raw) pairs. Once enough are in (`RefinementSettings`), the model is refined
from them (`core.noise.refinement`), at most once per `every_frames` and `every_seconds`.

Each refinement is a new version in the store (`NoiseModelVersions`), handed to the trainer and
inference (`use_noise_model` on each), logged, counted in
pn2v_live_noise_model_refinements_total and shown in the daemon's status.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from pn2v_live.core.noise import (
    NoiseModel,
    RefinedNoiseModel,
    noise_model_from_state,
)
from pn2v_live.core.noise.coverage import WARN_FRACTION
from pn2v_live.core.noise.refinement import (
    DEFAULT_MIN_PAIRS,
    RefinementRefused,
    calibrated_part,
    join_range,
    refine_noise_model,
)
from pn2v_live.pipeline.stage import Stage
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.telemetry import NOISE_MODEL_REFINEMENTS, NOISE_MODEL_SIGNAL_MAX

MAX_BUFFERED_PAIRS = 2_000_000  # pairs kept for the next refinement (newest frames win)
# A refused attempt doubles the frames the next one waits for, up to 2**6 × every_frames, so a
# calibration that needs no refinement does not cost a fit every few minutes.
MAX_BACKOFF_DOUBLINGS = 6
QUEUE_FRAMES = 1024  # frames waiting to be gathered (oldest dropped beyond)

ModelListener = Callable[[NoiseModel, str], None]
Pairs = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


@dataclass(frozen=True)
class RefinementSettings:
    """At most one refinement per `every_frames` frames with signal above the range and per
    `every_seconds`, and only with `min_pairs` pairs above it; after n refusals in a row the
    next attempt waits for 2**n times the frames (at most 2**MAX_BACKOFF_DOUBLINGS)."""

    every_frames: int = 50
    every_seconds: float = 300.0
    min_pairs: int = DEFAULT_MIN_PAIRS


class Handover(Generic[T]):
    """One value passed from one thread to another; a newer one replaces one not yet taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: T | None = None

    def put(self, value: T) -> None:
        with self._lock:
            self._value = value

    def take(self) -> T | None:
        with self._lock:
            value, self._value = self._value, None
        return value


def on_device(model: NoiseModel, device: torch.device | str) -> NoiseModel:
    """An independent copy of `model` on `device` (each stage owns its copy)."""
    return noise_model_from_state(model.state()).to(device)


class NoiseRefiner(Stage):
    """Gathers the pairs of frames whose signal goes above the noise model's range (`offer`,
    called after each denoised frame) and refines the model when `settings` allow (see the
    module docstring); `listeners` get every new model and its id."""

    def __init__(
        self,
        versions: NoiseModelVersions,
        model: NoiseModel,
        model_id: str,
        root_id: str,
        settings: RefinementSettings,
        listeners: list[ModelListener] = (),
    ):
        super().__init__("noise-refiner", idle_seconds=1.0)
        self.versions, self.settings, self.root_id = versions, settings, root_id
        self.model, self.model_id = model, model_id
        self.listeners = list(listeners)
        self.refinements = 0  # refinements by this process
        self.last: dict[str, Any] | None = None  # the latest refinement (or refusal) record
        self._queue: deque[tuple[Acquisition, int]] = deque(maxlen=QUEUE_FRAMES)
        self._lock = threading.Lock()
        # (acquisition, t) → (denoised, raw) values from the join range up, oldest first
        self._pairs: OrderedDict[tuple[str, int], Pairs] = OrderedDict()
        self._last_attempt = -float("inf")
        self._frames = 0  # frames gathered since the last attempt
        self._refused = 0  # attempts refused in a row: each doubles the frames the next needs
        NOISE_MODEL_SIGNAL_MAX.set(model.signal_range[1])

    def offer(self, acquisition: Acquisition, t: int, denoised: np.ndarray) -> None:
        """Note frame `t` for its pairs when its denoised twin goes above the model's signal
        range (cheap; called by inference after it writes a twin)."""
        top = self.model.signal_range[1]
        if float(np.mean(denoised > top)) > WARN_FRACTION:
            with self._lock:
                self._queue.append((acquisition, t))

    def status(self) -> dict[str, Any]:
        """What the daemon's status shows about the noise model in use."""
        refinement = self.model.metadata.get("refinement")
        return {
            "id": self.model_id,
            "kind": self.model.kind,
            "signal_range": list(self.model.signal_range),
            "refined_from": refinement.get("parent") if refinement else None,
            "refinements": self.refinements,
            "last_refinement": self.last,
        }

    def work(self) -> bool:
        with self._lock:
            offered = list(self._queue)
            self._queue.clear()
        for acquisition, t in offered:
            self._gather(acquisition, t)
            self.beat()
        if not self._due():
            return bool(offered)
        self._refine()
        return True

    def _gather(self, acquisition: Acquisition, t: int) -> None:
        """Keep frame t's pairs with signal from the join range up (newest frames first)."""
        raw = self.read_raw(acquisition, t)
        if raw is None:
            return
        try:
            denoised = acquisition.read_denoised(t)
        except Exception as error:  # a damaged chunk: this frame simply gives no pairs
            self.log.warning("denoised frame %d does not read back: %s", t, error)
            return
        if denoised is None:
            return
        low, _ = join_range(calibrated_part(self.model))
        keep = denoised >= low
        key = (acquisition.name, t)
        self._pairs.pop(key, None)
        self._frames += 1
        self._pairs[key] = (
            torch.from_numpy(np.ascontiguousarray(denoised[keep], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(raw[keep], dtype=np.float32)),
        )
        while sum(len(s) for s, _ in self._pairs.values()) > MAX_BUFFERED_PAIRS:
            self._pairs.popitem(last=False)

    def _due(self) -> bool:
        s = self.settings
        if self._frames < s.every_frames * 2 ** min(self._refused, MAX_BACKOFF_DOUBLINGS):
            return False
        if time.monotonic() - self._last_attempt < s.every_seconds:
            return False
        top = self.model.signal_range[1]
        return sum(int((signal > top).sum()) for signal, _ in self._pairs.values()) >= s.min_pairs

    def _fit(
        self, signal: torch.Tensor, observation: torch.Tensor, record: dict[str, Any]
    ) -> RefinedNoiseModel | Exception | None:
        """`refine_noise_model` in a worker thread: the fit takes seconds to minutes (the GMM's
        L-BFGS), and the stage keeps beating meanwhile so the watchdog sees it alive. Returns
        the refined model, the error that stopped it, or None when the stage is stopping (the
        fit is then abandoned)."""
        result: list[RefinedNoiseModel | Exception] = []

        def fit() -> None:
            try:
                result.append(
                    refine_noise_model(
                        self.model, signal, observation, self.settings.min_pairs, record
                    )
                )
            except Exception as error:
                result.append(error)

        worker = threading.Thread(target=fit, name="noise-refinement-fit", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(1.0)
            self.beat()
            if self.stopping:
                self.log.info("stopping: the noise-model refinement under way is abandoned")
                return None
        return result[0]

    def _refine(self) -> None:
        """Fit, store and hand over a refined model; or log and count why not. The gathered
        pairs are dropped either way (the next attempt waits for fresh frames)."""
        self._last_attempt, self._frames = time.monotonic(), 0
        keys = list(self._pairs)
        signal = torch.cat([s for s, _ in self._pairs.values()])
        observation = torch.cat([x for _, x in self._pairs.values()])
        self._pairs.clear()
        acquisitions = sorted({name for name, _ in keys})
        previous = self.model.signal_range
        parent = self.model.metadata.get("refinement") or {}
        record = {
            "parent": self.model_id,
            "root": self.root_id,
            "generation": int(parent.get("generation", 0)) + 1,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "acquisitions": acquisitions,
            "frames": len(keys),
        }
        started = time.monotonic()
        refined = self._fit(signal, observation, record)
        if refined is None:
            return  # stopping
        if isinstance(refined, Exception):
            error = refined
            if not isinstance(error, RefinementRefused):
                self.log.error("noise model refinement failed", exc_info=error)
            NOISE_MODEL_REFINEMENTS.labels("refused").inc()
            self.last = {**record, "outcome": "refused", "reason": str(error)}
            self._refused += 1
            self.log.warning(
                "signal above the noise model's range %.0f–%.0f ADU in %d frames, but the noise "
                "model is not refined: %s",
                *previous,
                len(keys),
                error,
                extra={"acquisition": ",".join(acquisitions)},
            )
            return
        version = self.versions.save(refined)
        self.model, self.model_id = refined, version.id
        self.refinements += 1
        self._refused = 0
        self.last = {**version.refinement, "id": version.id, "outcome": "refined"}
        NOISE_MODEL_REFINEMENTS.labels("refined").inc()
        NOISE_MODEL_SIGNAL_MAX.set(refined.signal_range[1])
        self.log.info(
            "noise model refined: %d frames went above its signal range %.0f–%.0f ADU, so %d "
            "(denoised, raw) pairs from %.0f ADU up were fitted; version %s (from %s) covers "
            "%.0f–%.0f ADU, stored in %s (%.1f s)",
            len(keys),
            *previous,
            refined.metadata["refinement"]["pairs"],
            refined.join[0],
            version.id,
            record["parent"],
            *refined.signal_range,
            version.path,
            time.monotonic() - started,
            extra={"acquisition": ",".join(acquisitions)},
        )
        for listener in self.listeners:
            listener(refined, version.id)
