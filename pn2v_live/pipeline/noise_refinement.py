"""Refining the noise model from the stream when its signal goes above the calibrated range.

The calibration rarely covers the brightest signal of later experiments. When more than
WARN_FRACTION of a denoised frame lies above the noise model's signal range, the frame's
(MMSE estimate = denoised twin, raw) pairs are gathered, as `calibrate --bootstrap` uses
(N2V prediction, raw) pairs. Once enough are in (`RefinementSettings`), `refine_noise_model`
fits a hybrid model (`calibration.fit_models`) to the pairs from the top OVERLAP_FRACTION of the
calibrated range upwards and joins it to the calibrated model across that overlap
(`RefinedNoiseModel`), after rescaling the pairs' spread to match the calibration in that
overlap. It refuses when the pairs' noise in the overlap disagrees with the calibration by more
than MAX_OVERLAP_VARIANCE_RATIO (a young model's twins that still hold, or smooth away, part of
the noise), and when the refined model does not explain held-back pairs above the range better
than the model in use (e.g. a Poisson–Gaussian calibration that extrapolates well already).

Each refinement is a new version in the store (`NoiseModelVersions`), handed to the trainer and
inference (`use_noise_model` on each), logged, counted in
pn2v_live_noise_model_refinements_total and shown in the daemon's status.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from pn2v_live.core.calibration import MIN_PAIRS_PER_ROW, fit_models
from pn2v_live.core.noise import (
    NoiseModel,
    PoissonGaussianNoiseModel,
    RefinedNoiseModel,
    as_pairs,
    noise_model_from_state,
)
from pn2v_live.core.noise.coverage import WARN_FRACTION
from pn2v_live.pipeline.stage import Stage
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.store import Acquisition
from pn2v_live.telemetry import NOISE_MODEL_REFINEMENTS, NOISE_MODEL_SIGNAL_MAX

OVERLAP_FRACTION = 0.2  # top share of the calibrated signal range the stream's fit joins across
MIN_OVERLAP_PAIRS = 200  # stream pairs in the overlap needed to compare with the calibration
# The stream's noise variance in the overlap must be within this factor of the calibration's.
MAX_OVERLAP_VARIANCE_RATIO = 2.0
HELD_OUT_FRACTION = 0.2  # pairs kept back to check that a refined model explains the stream better
MIN_NLL_GAIN = 0.005  # nats per pixel it must gain on them over the model in use
MIN_BINS = 16  # histogram rows of the stream's fit, at least ...
MAX_BINS = 256  # ... and at most; else one per MIN_PAIRS_PER_ROW pairs
MAX_BUFFERED_PAIRS = 2_000_000  # pairs kept for the next refinement (newest frames win)
# A refused attempt doubles the frames the next one waits for, up to 2**6 × every_frames, so a
# calibration that needs no refinement does not cost a fit every few minutes.
MAX_BACKOFF_DOUBLINGS = 6
QUEUE_FRAMES = 1024  # frames waiting to be gathered (oldest dropped beyond)

ModelListener = Callable[[NoiseModel, str], None]
Pairs = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")


class RefinementRefused(ValueError):
    """The stream's pairs cannot refine the model; the message says why."""


@dataclass(frozen=True)
class RefinementSettings:
    """At most one refinement per `every_frames` frames with signal above the range and per
    `every_seconds`, and only with `min_pairs` pairs above it; after n refusals in a row the
    next attempt waits for 2**n times the frames (at most 2**MAX_BACKOFF_DOUBLINGS)."""

    every_frames: int = 50
    every_seconds: float = 300.0
    min_pairs: int = 10_000


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


def calibrated_part(model: NoiseModel) -> NoiseModel:
    """The model from `pn2v-live calibrate` behind `model` (itself when not refined)."""
    return model.calibrated if isinstance(model, RefinedNoiseModel) else model


def join_range(calibrated: NoiseModel) -> tuple[float, float]:
    """Signal span (ADU) where a refined model blends from `calibrated` to the stream's fit."""
    low, high = calibrated.signal_range
    return high - OVERLAP_FRACTION * (high - low), high


def noise_variance(model: NoiseModel, signal: float, points: int = 8193) -> float:
    """Variance (ADU²) of x about `signal` under p(x | signal), by numerical integration."""
    reach = max(64.0, abs(signal) / 2)
    x = torch.linspace(signal - reach, signal + reach, points)
    with torch.no_grad():
        density = model.log_likelihood(x, torch.full_like(x, signal)).double().exp()
    return float((density * (x.double() - signal) ** 2).sum() / density.sum())


def refine_noise_model(
    current: NoiseModel,
    signal: np.ndarray | torch.Tensor,
    observation: np.ndarray | torch.Tensor,
    min_pairs: int = RefinementSettings.min_pairs,
    refinement: dict[str, Any] | None = None,
) -> RefinedNoiseModel:
    """`current`'s calibrated model below its join range, a hybrid fit of the (signal,
    observation) pairs from the join range upwards above it (see the module docstring).

    `signal` are the stream's signal estimates (denoised twins), `observation` the raw values,
    any matching shapes. A denoised twin holds a little of its pixel's own noise (the MMSE
    weighs the observation in) and errs a little, so the spread of x − s is not quite the
    noise's: it is rescaled by the ratio measured in the overlap, where the calibration is
    trusted, which also makes the two parts meet. HELD_OUT_FRACTION of the pairs are kept back,
    and the refined model must explain those above `current`'s range better than `current`
    does.

    Raises RefinementRefused saying why when there are fewer than `min_pairs` pairs above the
    range, too few in the overlap, a noise ratio there beyond MAX_OVERLAP_VARIANCE_RATIO, or no
    held-out gain. `refinement` goes to metadata["refinement"], with the pair counts, overlap
    ratio, held-out NLLs and signal ranges added.
    """
    calibrated = calibrated_part(current)
    low, high = join_range(calibrated)
    signal, observation = as_pairs(signal, observation)
    keep = signal >= low
    signal, observation = signal[keep], observation[keep]
    top = current.signal_range[1]
    above = int((signal > top).sum())
    if above < min_pairs:
        raise RefinementRefused(
            f"{above} pairs with signal above {top:.0f} ADU, {min_pairs} needed"
        )
    overlap = signal <= high
    if int(overlap.sum()) < MIN_OVERLAP_PAIRS:
        raise RefinementRefused(
            f"only {int(overlap.sum())} pairs in the overlap {low:.0f}–{high:.0f} ADU with the "
            f"calibration, {MIN_OVERLAP_PAIRS} needed to join the two"
        )
    residual = (observation[overlap] - signal[overlap]).double()
    level = float(signal[overlap].mean())
    ratio = float(residual.var()) / noise_variance(calibrated, level)
    if not 1 / MAX_OVERLAP_VARIANCE_RATIO <= ratio <= MAX_OVERLAP_VARIANCE_RATIO:
        raise RefinementRefused(
            f"in the overlap with the calibration (around {level:.0f} ADU) the denoised frames "
            f"leave {ratio:.2f}× the calibrated noise variance; the model's estimates are not yet "
            "good enough to measure the noise from"
        )
    observation = signal + (observation - signal) / math.sqrt(ratio)
    held = torch.rand(signal.numel(), generator=torch.Generator().manual_seed(0))
    held = held < HELD_OUT_FRACTION
    fit_s, fit_x = signal[~held], observation[~held]
    offset = calibrated.metadata.get("offset")
    try:
        poisson_gaussian = PoissonGaussianNoiseModel.fit(fit_s, fit_x, offset=offset)
    except ValueError as error:
        raise RefinementRefused(f"no noise level fits the pairs ({error})") from error
    bins = int(np.clip(fit_s.numel() // MIN_PAIRS_PER_ROW, MIN_BINS, MAX_BINS))
    stream = fit_models(("hybrid",), fit_s, fit_x, bins, poisson_gaussian)["hybrid"]
    stream.metadata.update(
        kind=stream.kind,
        pairs=int(fit_s.numel()),
        signal_range=[float(fit_s.min()), float(fit_s.max())],
        gain=poisson_gaussian.gain,
        offset=poisson_gaussian.offset,
        read_noise=poisson_gaussian.read_noise,
    )
    signal_range = (calibrated.signal_range[0], max(top, float(signal.max())))
    refined = RefinedNoiseModel(calibrated, stream, (low, high), signal_range)
    scored = held & (signal > top)
    before = current.nll(signal[scored], observation[scored])
    after = refined.nll(signal[scored], observation[scored])
    if not after < before - MIN_NLL_GAIN:
        raise RefinementRefused(
            f"the noise model in use already explains the held-back pairs above {top:.0f} ADU "
            f"as well ({before:.3f} nats per pixel; refined {after:.3f})"
        )
    refined.metadata = {
        **calibrated.metadata,
        "kind": RefinedNoiseModel.kind,
        "signal_range": list(signal_range),
        "refinement": {
            **(refinement or {}),
            "pairs": int(signal.numel()),
            "pairs_above": above,
            "overlap_variance_ratio": round(ratio, 4),
            "held_out_nll_above": {"before": round(before, 4), "after": round(after, 4)},
            "previous_signal_range": list(current.signal_range),
            "signal_range": list(signal_range),
            "join": [low, high],
        },
    }
    return refined


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
