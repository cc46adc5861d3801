"""The trainer stage: keeps fine-tuning PN2V on the accumulated raw frames, in bounded rounds.

A round starts after `every_frames` new frames or `every_seconds` after the previous round (at
once while no model exists). It trains the working model for `steps_per_round` steps on patches
of the recent frames (newer ones drawn more often) of the acquisition with the most new frames
(while idle: the one with the newest frame; only acquisitions with a frame stored within
RECENT_SECONDS or not yet denoised are looked at), the learning rate falling along a cosine from
`learning_rate` to 0 within the round (so each round ends settled and the next can follow a
changing sample), then compares the working model with the promoted one on the same validation
batch from held-back frames (t % 8 == 3, never trained on) and promotes it through the registry
only if it is better and measurably better than raw.

The first model: rounds wait for `first_model_frames` frames (or a closed acquisition) and
last `first_model_steps` steps; a model is promoted only when the lower bound of its ground-
truth-free gain estimate (`core.quality`, held-back frames) reaches `min_gain_db`; until then
the viewer shows raw frames as "learning".

Sharing the machine: inference comes first, but while it has a backlog training still takes up to
`training_share` of the wall time (measured over the last SHARE_WINDOW_SECONDS), so a stream faster
than inference cannot starve training. Steps taken while no model is served do not count: they
took no time inference could have used, so the first model is not followed by a pause. A round
after the first model also ends its steps early (waits included) when more would not leave time
to validate, estimate and promote within ROUND_SHARE of `every_seconds` (that part taken as its
longest in the last AFTER_STEPS_ROUNDS rounds, as it varies with what else runs, and a round that
had the machine to itself counted as if it had shared it): on a slow or busy machine rounds still
come every `every_seconds`, with the steps that fitted. On a CPU that inference shares, each step
and evaluation takes its turn (`compute_turns`).

The network sees the frames `context` around each frame (see `core.context`). With "auto", the
round that starts a new model first trains a single-frame model for BASE_SHARE of its steps,
then it and each candidate window (fresh, residual: `core.context_choice`) for an equal part of
PILOT_SHARE, and goes on with the one of lowest validation loss on the held-back frames (a
pinned "A:B" skips the choice). What a round reads and holds back: `training_series`.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from pn2v_live.core.context import CANDIDATES, SPATIAL, Context
from pn2v_live.core.context_choice import BASE_SHARE, PILOT_SHARE
from pn2v_live.core.model import PRECISIONS, Denoiser
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.patches import sample_patches
from pn2v_live.core.registration import Shifts
from pn2v_live.core.training import Training, budget_used, cosine_rate
from pn2v_live.pipeline.busy_time import BusyTime
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.pipeline.compute_turns import ComputeTurns
from pn2v_live.pipeline.noise_refinement import Handover, on_device
from pn2v_live.pipeline.stage import Stage
from pn2v_live.pipeline.training_series import (
    Series,
    enough_for_first_model,
    promoted_loss,
    read_series,
    usable_window,
)
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store
from pn2v_live.storage.working_set import WorkingSet
from pn2v_live.telemetry import TRAINER_STATE, TRAINING_LOSS, TRAINING_ROUNDS, VALIDATION_LOSS

HISTORY_ROUNDS = 1000  # rounds kept in `history` for the viewer's loss plot
SHARE_WINDOW_SECONDS = 60.0  # training's share of time is measured over this much of the past
ROUND_SHARE = 0.85  # of `every_seconds` a round after the first model may take
AFTER_STEPS_ROUNDS = 3  # rounds whose after-steps time bounds the next round's steps
SHARED_SLOWDOWN = 2.0  # after-steps time beside a busy inference stage / with the machine alone
LATE_ATTEMPT_SECONDS = 5.0  # an attempt this late still keeps its place in the schedule
RECENT_SECONDS = 12 * 3600.0  # rounds train on acquisitions with a frame this recent (or undone)


@dataclass(frozen=True)
class TrainerSettings:
    every_frames: int
    every_seconds: float
    steps_per_round: int
    patch_size: int
    batch_size: int
    k: int
    learning_rate: float
    precision: str = "auto"  # U-Net body: "auto", "float32" or "bfloat16" (core.model.PRECISIONS)
    context: str = "auto"  # temporal window "A:B", or "auto" (chosen by validation loss)
    first_model_frames: int = 16  # frames an acquisition needs (or to be closed) for a first model
    first_model_steps: int = 300  # steps of the rounds that make the first model
    min_gain_db: float = 1.0  # a model is promoted only when its estimated gain's lower bound ≥
    training_share: float = 0.5  # share of wall time training may take while inference is behind


class Trainer(Stage):
    """Bounded fine-tuning rounds on `device`; `history` holds the latest rounds' records."""

    def __init__(
        self,
        store: Store,
        registry: ModelRegistry,
        noise_model: NoiseModel,
        noise_model_id: str,
        settings: TrainerSettings,
        device: torch.device,
        inference_idle: threading.Event,  # set while no fresh frame waits for inference
        seed: int = 0,
        camera: CameraFrames | None = None,  # sCMOS camera maps (None: frames as they are)
        shifts: Shifts | None = None,  # frame shifts measured (shared with other stages)
        turns: ComputeTurns | None = None,  # shared with inference on a CPU (compute_turns)
    ):
        super().__init__("trainer", idle_seconds=0.5, disk_path=store.root)
        self.store, self.registry, self.settings, self.device = store, registry, settings, device
        self.noise_model, self.noise_model_id = noise_model, noise_model_id
        self.inference_idle, self.camera = inference_idle, camera or CameraFrames(noise_model)
        self._bf16 = PRECISIONS[settings.precision]
        self.rng = np.random.default_rng(seed)
        self.rounds = 0
        # what validating, estimating and promoting took in the last rounds (s)
        self._after_steps_s: deque[float] = deque([0.0], maxlen=AFTER_STEPS_ROUNDS)
        self.state = "idle"  # "idle", "training" or "waiting" (for inference); see metrics
        self.history: deque[dict] = deque(maxlen=HISTORY_ROUNDS)
        self._training: Training | None = None
        self._steps_since_promotion = 0
        self._counting = False  # new frames are counted from the first pass on
        self._last_round = time.monotonic()
        self._unreadable = False  # the last attempt's window had no readable frame of a kind
        self._next_noise_model: Handover[tuple[NoiseModel, str]] = Handover()  # use_noise_model
        self._busy = BusyTime(SHARE_WINDOW_SECONDS)  # when training steps ran
        self.working = WorkingSet(store, RECENT_SECONDS)  # what a round may train on
        self.shifts = Shifts() if shifts is None else shifts
        self.turns = turns or ComputeTurns()

    def work(self) -> bool:
        """Run a round when one is due, on the acquisition with the most new frames (ties, e.g.
        while the microscope is idle: the one with the newest frame)."""
        self._switch_noise_model()
        acquisitions = self.working.acquisitions()
        if not self._counting:  # frames stored before this start are not new
            self.working.stored.clear()
            self._counting = True
        growth = self.working.stored  # frames stored since the last round, by acquisition
        new_frames = sum(growth.values())
        # No model yet: try at once, but after a window that did not read back only on news.
        first_model = self.registry.current() is None and not (self._unreadable and not new_frames)
        overdue = time.monotonic() - self._last_round >= self.settings.every_seconds
        if new_frames < self.settings.every_frames and not (overdue or first_model):
            return False
        if self.registry.current() is None:  # a first model learns from enough frames
            enough = self.settings.first_model_frames
            acquisitions = [a for a in acquisitions if enough_for_first_model(a, enough)]
        ranked = sorted(
            acquisitions, key=lambda a: (growth[a.name], a.last_frame_at or 0.0), reverse=True
        )
        chosen = next(((a, w) for a in ranked if (w := usable_window(a))), None)
        if chosen is None:
            return False  # too few frames yet for a held-back one, or frames too small
        name = chosen[0].name
        growth.clear()
        self._last_round = self._attempt_time(overdue)
        series, weights = read_series(*chosen, self.read_raw, self.camera, self.shifts)
        self._unreadable = not series.trained or not series.held_back
        if self._unreadable:
            return False  # every frame of one kind unreadable: wait for new frames or the clock
        self._set_state("training")
        try:
            self._round(name, series, weights)
        except Exception:
            TRAINING_ROUNDS.labels("failed").inc()
            raise
        finally:
            self._set_state("idle")
        return True

    def _attempt_time(self, overdue: bool) -> float:
        """When this attempt counts as begun (monotonic s): one due by the clock and at most
        LATE_ATTEMPT_SECONDS late keeps its place, so rounds do not drift later by a poll each."""
        now = time.monotonic()
        due = self._last_round + self.settings.every_seconds
        return due if overdue and now - due <= LATE_ATTEMPT_SECONDS else now

    def use_noise_model(self, model: NoiseModel, model_id: str) -> None:
        """Train with `model` (a refined noise model) from the next round on, and record
        `model_id` in the models promoted from then on; thread-safe."""
        self._next_noise_model.put((on_device(model, self.device), model_id))

    def _switch_noise_model(self) -> None:
        """Take up a noise model handed over by `use_noise_model` (between rounds), fine-tuning
        under it in a round due at once: a model trained on it (and, once promoted, the back-fill
        of every frame) follows without waiting for new frames or `every_seconds`."""
        handed = self._next_noise_model.take()
        if handed is None:
            return
        self._last_round = -math.inf
        self.noise_model, self.noise_model_id = handed
        if self._training is not None:
            self._training.noise_model = self.noise_model
        self.log.info("training with noise model %s from the next round on", self.noise_model_id)

    def _set_state(self, state: str) -> None:
        self.state = state
        TRAINER_STATE.state(state)

    def _round(self, name: str, series: Series, weights: np.ndarray) -> None:
        s = self.settings
        patch = min(s.patch_size, *(side - side % 8 for side in series.frame_shape))
        started = time.monotonic()
        first_model = self.registry.current() is None
        steps = s.first_model_steps if first_model else s.steps_per_round
        chosen = self._working_model(series, weights, patch, steps)
        if chosen is None:
            return  # stopping during the choice of context
        training, spent = chosen
        # the first model takes its steps; later rounds keep to their share of every_seconds
        # (`_last_round`: when this attempt began, reading its frames included)
        since = time.monotonic() - self._last_round
        left = s.every_seconds * ROUND_SHARE - max(self._after_steps_s) - since
        seconds = math.inf if first_model else left
        losses = self._steps(training, series, weights, patch, max(1, steps - spent), seconds)
        if losses is None:
            return  # stopping: abandon the round, nothing is promoted
        steps_ended = time.monotonic()
        alone = self.inference_idle.is_set()
        self._steps_since_promotion += len(losses)
        validation_batch = series.validation_batch(training.denoiser, patch)
        spread = self.turns.run(training.fit_prior_spread, validation_batch)
        val_loss = self.turns.run(training.validation_loss, validation_batch)
        if not np.isfinite(val_loss) or not np.all(np.isfinite(losses)):
            self._training = None  # diverged: the next round restarts from the promoted model
            raise FloatingPointError(
                f"training diverged (non-finite loss) on {name}; restarting from the promoted "
                "model next round. Check the noise model: its log-likelihood must stay finite."
            )
        if self.stopping:
            return  # each of these steps takes long on a busy CPU: stop between them
        baseline = self.turns.run(
            promoted_loss, self.registry, series, patch, self.noise_model, self.device, self._bf16
        )
        if self.stopping:
            return
        estimate = self.turns.run(series.estimated_gain, training, self.noise_model, patch)
        promoted = None
        if estimate.lower_db >= s.min_gain_db:  # never show a model not measurably above raw
            promoted = self.registry.promote(
                training.denoiser,
                validation_loss=val_loss,
                baseline_loss=baseline,
                training_frames=len(series.trained),
                training_steps=self._steps_since_promotion,
                noise_model_id=self.noise_model_id,
                camera_maps_id=self.camera.maps_id,
                estimated_gain_db=estimate.gain_db,
                estimated_gain_uncertainty_db=estimate.uncertainty_db,
            )
        if promoted is not None:
            self._steps_since_promotion = 0
        after_steps = time.monotonic() - steps_ended
        # measured with the machine to itself (e.g. the first model's, before inference runs),
        # it would take about SHARED_SLOWDOWN times as long beside a busy inference stage
        alone = alone and self.inference_idle.is_set()
        self._after_steps_s.append(after_steps * (SHARED_SLOWDOWN if alone else 1.0))
        outcome = "promoted" if promoted else "kept"
        TRAINING_ROUNDS.labels(outcome).inc()
        TRAINING_LOSS.set(float(np.mean(losses)))
        VALIDATION_LOSS.set(val_loss)
        self.rounds += 1
        record = {
            "round": self.rounds,
            "time": time.time(),
            "acquisition": name,
            "context": str(training.denoiser.context),
            "steps": len(losses),
            "training_loss": float(np.mean(losses)),
            "validation_loss": val_loss,
            "prior_spread": spread,
            "promoted_loss": baseline,
            "estimated_gain_db": estimate.gain_db,
            "estimated_gain_uncertainty_db": estimate.uncertainty_db,
            "promoted_version": promoted.version if promoted else None,
            "seconds": time.monotonic() - started,
            "after_steps_seconds": after_steps,
        }
        self.history.append(record)
        self.log.info(
            "round %d on %d frames, context %s: training loss %.4f, validation loss %.4f "
            "(promoted model %s), estimated gain over raw %.1f ± %.1f dB -> %s",
            record["round"],
            len(series.trained),
            record["context"],
            record["training_loss"],
            val_loss,
            "none" if baseline is None else f"{baseline:.4f}",
            estimate.gain_db,
            estimate.uncertainty_db,
            f"version {promoted.version}" if promoted else "kept current model",
            extra={"acquisition": name},
        )

    def _steps(
        self,
        training: Training,
        series: Series,
        weights: np.ndarray,
        patch: int,
        steps: int,
        seconds: float = math.inf,
    ) -> list[float] | None:
        """Up to `steps` optimiser steps (at least one) on patches of `series`, fewer when
        `seconds` of wall time (waits for inference included) run out first, the learning rate
        falling along a cosine over whichever budget ends first; the losses, or None when the
        stage is stopping."""
        s = self.settings
        windows = series.training_windows(training.denoiser.context)
        losses: list[float] = []
        # the step's own time counts as training's share (not the wait for its turn), and only
        # while a model is served: before, inference had nothing to run, so none was taken from it
        if self.registry.current() is not None:
            optimise = functools.partial(self._busy.timed, training.step)
        else:
            optimise = training.step
        begun = time.monotonic()
        for step in range(steps):
            done = budget_used(step, steps, time.monotonic() - begun, seconds / 60)
            if done >= 1 and losses:
                break
            if not self._wait_for_turn():
                return None
            batch = sample_patches(windows, s.batch_size, patch, self.rng, weights)
            rate = cosine_rate(s.learning_rate, min(done, 1.0))
            losses.append(self.turns.run(optimise, batch, rate))
            self.beat()
        return None if self.stopping else losses

    def _working_model(
        self, series: Series, weights: np.ndarray, patch: int, steps: int
    ) -> tuple[Training, int] | None:
        """The model being fine-tuned, and how many of the round's `steps` choosing it took:
        kept across rounds, started from the promoted one when its context is the pinned one
        (or any, with "auto"), else new, its context chosen by `_choose_context` under "auto".
        None when the stage stopped while choosing."""
        if self._training is not None:
            return self._training, 0
        pinned = None if self.settings.context == "auto" else Context.parse(self.settings.context)
        denoiser = self.registry.load()[0] if self.registry.current() is not None else None
        usable = denoiser is not None and denoiser.mode == "pn2v"  # not an initial N2V model
        if usable and pinned in (None, denoiser.context):
            self._training = self._new_training(denoiser)
        elif pinned is not None:
            self._training = self._fresh_training(series, pinned)
        else:
            chosen = self._choose_context(series, weights, patch, steps)
            if chosen is not None:
                self._training = chosen[0]
            return chosen
        return self._training, 0

    def _choose_context(
        self, series: Series, weights: np.ndarray, patch: int, round_steps: int
    ) -> tuple[Training, int] | None:
        """A single-frame model trains BASE_SHARE of the round's steps, then it and each window
        the frames allow (`core.context_choice`) a part of PILOT_SHARE; the one with the lowest
        spread-fitted validation loss on the held-back frames, and the steps all this took."""
        base = self._fresh_training(series, SPATIAL)
        base_steps = max(1, round(round_steps * BASE_SHARE))
        if self._steps(base, series, weights, patch, base_steps) is None:
            return None
        candidates = [c for c in CANDIDATES if c.channels <= len(series.frames)]
        steps = max(1, round(round_steps * PILOT_SHARE / len(candidates)))
        best, best_loss = None, float("inf")
        for context in candidates:
            training = base if context == SPATIAL else self._fresh_training(series, context)
            if self._steps(training, series, weights, patch, steps) is None:
                return None
            batch = series.validation_batch(training.denoiser, patch)
            self.turns.run(training.fit_prior_spread, batch, draws=1)  # as it would denoise
            loss = self.turns.run(training.validation_loss, batch)
            self.log.info("context %s: validation loss %.4f", context, loss)
            if best is None or loss < best_loss:
                best, best_loss = training, loss
        # the steps of the model kept (a temporal window started fresh)
        self._steps_since_promotion += steps + (base_steps if best is base else 0)
        self.log.info("context %s chosen by validation loss", best.denoiser.context)
        return best, base_steps + steps * len(candidates)

    def _fresh_training(self, series: Series, context: Context) -> Training:
        return self._new_training(series.new_denoiser(context, self.settings.k))

    def _new_training(self, denoiser: Denoiser) -> Training:
        denoiser.net.to(self.device)
        return Training(denoiser, self.noise_model, lr=self.settings.learning_rate, bf16=self._bf16)

    def _wait_for_turn(self) -> bool:
        """Block while inference has fresh frames and training has had its `training_share` of
        the last SHARE_WINDOW_SECONDS; False when the stage is stopping."""
        while not (
            self.inference_idle.is_set()
            or self._busy.share(time.monotonic()) < self.settings.training_share
        ):
            self._set_state("waiting")
            self.beat()
            if self.stopping:
                return False
            self.inference_idle.wait(0.1)
        self._set_state("training")
        return not self.stopping
