"""Refining the noise model from the stream when its signal goes above the calibrated range.

The stage follows the stored raw frames (`WorkingSet`), newest first, at most one frame per
`gather_seconds` and using at most `gather_share` of one core. A frame's signal estimate is the mean
of the other frames of its WINDOW, registered onto it (`core.noise.refinement.other_frames_mean`):
it needs no model, so refinement can come before the first trained model, and a calibration so poor
that no model trained with it is ever good enough to show is repaired all the same. When more than
WARN_FRACTION of that estimate lies above the noise model's signal range, the frame's (estimate,
raw) pairs are gathered. Once enough are in (`RefinementSettings`), the model is refined from them
(`core.noise.refinement`), at most once per `every_frames` frames and `every_seconds`.

Each refinement is a new version in the store (`NoiseModelVersions`), handed to the trainer and
inference (`use_noise_model` on each), logged, counted in
pn2v_live_noise_model_refinements_total and shown in the daemon's status.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from pn2v_live.core.context import Context, window
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
    other_frames_mean,
    refine_noise_model,
)
from pn2v_live.core.registration import Shifts
from pn2v_live.pipeline.stage import Stage
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.store import Store
from pn2v_live.storage.working_set import WorkingSet
from pn2v_live.telemetry import NOISE_MODEL_REFINEMENTS, NOISE_MODEL_SIGNAL_MAX

MAX_BUFFERED_PAIRS = 2_000_000  # pairs kept for the next refinement (newest frames win)
# A refused attempt doubles the frames the next one waits for, up to 2**6 × every_frames, so a
# calibration that needs no refinement does not cost a fit every few minutes.
MAX_BACKOFF_DOUBLINGS = 6
WINDOW = Context(8, 2)  # the frames whose registered mean estimates a frame's signal
RECENT_FRAMES = 64  # only an acquisition's newest ready frames are gathered ...
RECENT_SECONDS = 600.0  # ... of acquisitions given a raw frame within this time

ModelListener = Callable[[NoiseModel, str], None]
Pairs = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


@dataclass(frozen=True)
class RefinementSettings:
    """At most one refinement per `every_frames` frames with signal above the range and per
    `every_seconds`, and only with `min_pairs` pairs above it; after n refusals in a row the
    next attempt waits for 2**n times the frames (at most 2**MAX_BACKOFF_DOUBLINGS). At most
    one frame is gathered per `gather_seconds` (each costs reading its window's frames and
    registering them onto it), and gathering takes at most `gather_share` of one core (a gather
    of s seconds is followed by a pause of s · (1 / gather_share − 1)), so the stage's share of
    the CPU grows neither with the camera's frame rate nor with its frame size."""

    every_frames: int = 16  # as many as a first model waits for, so both can come together
    every_seconds: float = 300.0
    min_pairs: int = DEFAULT_MIN_PAIRS
    gather_seconds: float = 1.0
    gather_share: float = 0.25


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
    """Gathers the pairs of stored frames whose signal goes above the noise model's range and
    refines the model when `settings` allow (see the module docstring); `listeners` get every
    new model and its id."""

    def __init__(
        self,
        store: Store,
        versions: NoiseModelVersions,
        model: NoiseModel,
        model_id: str,
        root_id: str,
        settings: RefinementSettings,
        listeners: list[ModelListener] = (),
        shifts: Shifts | None = None,  # frame shifts measured (shared with other stages)
    ):
        super().__init__("noise-refiner", idle_seconds=1.0)
        self.versions, self.settings, self.root_id = versions, settings, root_id
        self.model, self.model_id = model, model_id
        self.listeners = list(listeners)
        self.refinements = 0  # refinements by this process
        self.last: dict[str, Any] | None = None  # the latest refinement (or refusal) record
        self.working = WorkingSet(store, RECENT_SECONDS)
        self._looked_at: dict[str, set[int]] = {}  # frames already gathered or passed over
        self.shifts = Shifts() if shifts is None else shifts
        self._next_gather = -float("inf")  # monotonic s
        # (acquisition, t) → (estimate, raw) values from the join range up, oldest first
        self._pairs: OrderedDict[tuple[str, int], Pairs] = OrderedDict()
        self._last_attempt = -float("inf")
        self._frames = 0  # frames gathered since the last attempt
        self._refused = 0  # attempts refused in a row: each doubles the frames the next needs
        NOISE_MODEL_SIGNAL_MAX.set(model.signal_range[1])

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
        gathered = False
        if time.monotonic() >= self._next_gather:
            gathered = self._gather_next()
        if not self._due():
            return gathered
        self._refine()
        return True

    def _gather_next(self) -> bool:
        """Look at the newest ready frame not yet looked at, of the first acquisition that has
        one; whether there was one."""
        acquisitions = self.working.acquisitions()
        names = {a.name for a in acquisitions}
        for name in set(self._looked_at) - names:
            del self._looked_at[name]
        for acquisition in acquisitions:
            t = self._next_frame(acquisition)
            if t is not None:
                started = time.monotonic()
                self._gather(acquisition, t)
                spent = time.monotonic() - started
                wait = max(self.settings.gather_seconds, spent / self.settings.gather_share)
                self._next_gather = started + wait
                return True
        return False

    def _next_frame(self, acquisition: Acquisition) -> int | None:
        """The newest of `acquisition`'s last RECENT_FRAMES frames whose window is stored (its
        WINDOW.after later frames, unless the acquisition is closed) and not yet looked at."""
        ready = acquisition.valid_t if acquisition.closed else acquisition.valid_t - WINDOW.after
        oldest = max(0, ready - RECENT_FRAMES)
        looked_at = {n for n in self._looked_at.get(acquisition.name, ()) if n >= oldest}
        self._looked_at[acquisition.name] = looked_at
        t = next((n for n in range(ready - 1, oldest - 1, -1) if n not in looked_at), None)
        if t is not None:
            looked_at.add(t)
        return t

    def _gather(self, acquisition: Acquisition, t: int) -> None:
        """Keep frame t's (estimate, raw) pairs from the join range up when more than
        WARN_FRACTION of its estimate lies above the model's range (newest frames first)."""
        frames = self.read_stored(acquisition, WINDOW.frame_numbers(t))
        if t not in frames:
            return
        registration = self.shifts.series(acquisition.identity)
        estimate = other_frames_mean(window(frames, t, WINDOW, registration=registration),
                                     WINDOW.before)  # fmt: skip
        seen = np.isfinite(estimate)
        top = self.model.signal_range[1]
        if not seen.any() or float(np.mean(estimate[seen] > top)) <= WARN_FRACTION:
            return
        low, _ = join_range(calibrated_part(self.model))
        keep = seen & (estimate >= low)
        key = (acquisition.name, t)
        self._pairs.pop(key, None)
        self._frames += 1
        self._pairs[key] = (
            torch.from_numpy(np.ascontiguousarray(estimate[keep], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(frames[t][keep], dtype=np.float32)),
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
            "(estimate, raw) pairs from %.0f ADU up were fitted; version %s (from %s) covers "
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
