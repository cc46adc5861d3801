"""The trainer stage: keeps fine-tuning PN2V on the accumulated raw frames, in bounded rounds.

A round starts after `every_frames` new frames or `every_seconds` after the previous round (at
once while no model exists). It trains the working model for `steps_per_round` steps on patches
of the recent frames (newer ones drawn more often) of the acquisition with the most new frames
(while idle: the one with the newest frame), the learning rate falling along a cosine from
`learning_rate` to 0 within the round (so each round ends settled and the next can follow a
changing sample), then compares the working model with the promoted one on the same validation
batch from held-back frames (t % 8 == 3, never trained on) and promotes it through the registry
only if it is better. Before every step it waits until inference has no fresh frame waiting, so
training never delays denoising.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from pn2v_live.core.model import PRECISIONS, new_denoiser, normalisation_of
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.training import Training, cosine_rate, sample_patches
from pn2v_live.metrics import TRAINER_STATE, TRAINING_LOSS, TRAINING_ROUNDS, VALIDATION_LOSS
from pn2v_live.pipeline.stage import Stage
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Acquisition, Store

VALIDATION_PERIOD = 8  # frames t with t % 8 == 3 are held back for validation
VALIDATION_PHASE = 3
VALIDATION_PATCHES = 32
WINDOW_FRAMES = 400  # newest frames a round samples from ...
WINDOW_BYTES = 512 * 2**20  # ... as long as they fit in this much memory
HALF_LIFE_FRAMES = 100  # a frame this much older than the newest is drawn half as often
MIN_SIDE = 8  # smallest frame side a patch (a multiple of 8) fits in
HISTORY_ROUNDS = 1000  # rounds kept in `history` for the viewer's loss plot


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
    ):
        super().__init__("trainer", idle_seconds=0.5)
        self.store, self.registry, self.settings, self.device = store, registry, settings, device
        self.noise_model, self.noise_model_id = noise_model, noise_model_id
        self.inference_idle = inference_idle
        self._bf16 = PRECISIONS[settings.precision]
        self.rng = np.random.default_rng(seed)
        self.rounds = 0
        self.state = "idle"  # "idle", "training" or "waiting" (for inference); see metrics
        self.history: deque[dict] = deque(maxlen=HISTORY_ROUNDS)
        self._training: Training | None = None
        self._steps_since_promotion = 0
        self._seen: dict[str, int] | None = None  # frames per acquisition at the last round
        self._last_round = time.monotonic()
        self._unreadable = False  # the last attempt's window had no readable frame of a kind

    def work(self) -> bool:
        """Run a round when one is due, on the acquisition with the most new frames (ties, e.g.
        while the microscope is idle: the one with the newest frame)."""
        acquisitions = self.store.open_acquisitions()
        counts = {a.name: a.frame_count for a in acquisitions}
        if self._seen is None:  # frames stored before this start are not new
            self._seen = counts
        growth = {name: n - self._seen.get(name, 0) for name, n in counts.items()}
        new_frames = sum(growth.values())
        # No model yet: try at once, but after a window that did not read back only on news.
        first_model = self.registry.current() is None and not (self._unreadable and not new_frames)
        overdue = time.monotonic() - self._last_round >= self.settings.every_seconds
        if new_frames < self.settings.every_frames and not (overdue or first_model):
            return False
        ranked = sorted(
            acquisitions, key=lambda a: (growth[a.name], a.last_frame_at or 0.0), reverse=True
        )
        chosen = next(((a, w) for a in ranked if (w := _usable_window(a))), None)
        if chosen is None:
            return False  # too few frames yet for a held-back one, or frames too small
        name = chosen[0].name
        self._seen, self._last_round = counts, time.monotonic()  # an attempt, read or not
        train_frames, weights, val_frames = self._frames(*chosen)
        self._unreadable = not train_frames or not val_frames
        if self._unreadable:
            return False  # every frame of one kind unreadable: wait for new frames or the clock
        self._set_state("training")
        try:
            self._round(name, train_frames, weights, val_frames)
        except Exception:
            TRAINING_ROUNDS.labels("failed").inc()
            raise
        finally:
            self._set_state("idle")
        return True

    def _set_state(self, state: str) -> None:
        self.state = state
        TRAINER_STATE.state(state)

    def _frames(
        self, acquisition: Acquisition, window: tuple[list[int], list[int]]
    ) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
        """The training frames of `window` (see `_usable_window`) with recency weights, and its
        held-back validation frames; a damaged frame is left out (`Stage.read_raw`)."""
        trained, held_back = window
        frames = {t: self.read_raw(acquisition, t) for t in trained + held_back}
        trained = [t for t in trained if frames[t] is not None]
        ages = max(frames) - np.asarray(trained, dtype=float)
        val_frames = [frames[t] for t in held_back if frames[t] is not None]
        return [frames[t] for t in trained], 0.5 ** (ages / HALF_LIFE_FRAMES), val_frames

    def _round(
        self,
        name: str,
        train_frames: list[np.ndarray],
        weights: np.ndarray,
        val_frames: list[np.ndarray],
    ) -> None:
        s = self.settings
        patch = min(s.patch_size, *(side - side % 8 for side in train_frames[0].shape))
        training = self._working_model(train_frames)
        losses = []
        started = time.monotonic()
        for step in range(s.steps_per_round):
            if not self._wait_for_turn():
                return  # stopping: abandon the round, nothing is promoted
            batch = sample_patches(train_frames, s.batch_size, patch, self.rng, weights)
            rate = cosine_rate(s.learning_rate, step / s.steps_per_round)
            losses.append(training.step(batch, rate))
            self.beat()
        if self.stopping:
            return
        self._steps_since_promotion += s.steps_per_round
        val_batch = sample_patches(val_frames, VALIDATION_PATCHES, patch, np.random.default_rng(0))
        val_loss = training.validation_loss(val_batch)
        if not np.isfinite(val_loss) or not np.all(np.isfinite(losses)):
            self._training = None  # diverged: the next round restarts from the promoted model
            raise FloatingPointError(
                f"training diverged (non-finite loss) on {name}; restarting from the promoted "
                "model next round. Check the noise model: its log-likelihood must stay finite."
            )
        baseline = self._promoted_loss(val_batch)
        promoted = self.registry.promote(
            training.denoiser,
            validation_loss=val_loss,
            baseline_loss=baseline,
            training_frames=len(train_frames),
            training_steps=self._steps_since_promotion,
            noise_model_id=self.noise_model_id,
        )
        if promoted is not None:
            self._steps_since_promotion = 0
        outcome = "promoted" if promoted else "kept"
        TRAINING_ROUNDS.labels(outcome).inc()
        TRAINING_LOSS.set(float(np.mean(losses)))
        VALIDATION_LOSS.set(val_loss)
        self.rounds += 1
        record = {
            "round": self.rounds,
            "time": time.time(),
            "acquisition": name,
            "training_loss": float(np.mean(losses)),
            "validation_loss": val_loss,
            "promoted_loss": baseline,
            "promoted_version": promoted.version if promoted else None,
            "seconds": time.monotonic() - started,
        }
        self.history.append(record)
        self.log.info(
            "round %d on %d frames: training loss %.4f, validation loss %.4f "
            "(promoted model %s) -> %s",
            record["round"],
            len(train_frames),
            record["training_loss"],
            val_loss,
            "none" if baseline is None else f"{baseline:.4f}",
            f"version {promoted.version}" if promoted else "kept current model",
            extra={"acquisition": name},
        )

    def _working_model(self, train_frames: list[np.ndarray]) -> Training:
        """The model being fine-tuned: kept across rounds, started from the promoted one."""
        if self._training is None:
            denoiser = self.registry.load()[0] if self.registry.current() is not None else None
            if denoiser is None or denoiser.mode != "pn2v":  # none yet, or an N2V initial model
                mean, std = normalisation_of(train_frames)
                denoiser = new_denoiser("pn2v", mean, std, k=self.settings.k)
            denoiser.net.to(self.device)
            self._training = Training(
                denoiser, self.noise_model, lr=self.settings.learning_rate, bf16=self._bf16
            )
        return self._training

    def _promoted_loss(self, val_batch: torch.Tensor) -> float | None:
        """The promoted model's loss on `val_batch` (None when nothing is promoted yet)."""
        if self.registry.current() is None:
            return None
        denoiser, _ = self.registry.load()
        denoiser.net.to(self.device)
        if denoiser.mode != "pn2v":
            return None  # an initial N2V/supervised model: any PN2V model replaces it
        return Training(denoiser, self.noise_model, bf16=self._bf16).validation_loss(val_batch)

    def _wait_for_turn(self) -> bool:
        """Block while inference has fresh frames; False when the stage is stopping."""
        while not self.inference_idle.wait(0.5):
            self._set_state("waiting")
            self.beat()
            if self.stopping:
                return False
        self._set_state("training")
        return not self.stopping


def _usable_window(acquisition: Acquisition) -> tuple[list[int], list[int]] | None:
    """(training, held-back) frame numbers a round would use: the newest WINDOW_FRAMES (fewer
    when they would exceed WINDOW_BYTES, never fewer than one validation period). None when a
    round cannot use `acquisition`: frames under MIN_SIDE pixels, or no frame of one kind."""
    if min(acquisition.frame_shape) < MIN_SIDE:
        return None
    frame_bytes = acquisition.dtype.itemsize * int(np.prod(acquisition.frame_shape))
    window = min(WINDOW_FRAMES, max(VALIDATION_PERIOD, WINDOW_BYTES // frame_bytes))
    recent = acquisition.stored_frames()[-window:]
    held_back = [t for t in recent if t % VALIDATION_PERIOD == VALIDATION_PHASE]
    trained = [t for t in recent if t % VALIDATION_PERIOD != VALIDATION_PHASE]
    return (trained, held_back) if trained and held_back else None


def pick_device(name: str) -> torch.device:
    """The torch device for a config value: "auto" is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
