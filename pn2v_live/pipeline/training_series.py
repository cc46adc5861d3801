"""The frames a training round reads: which ones (the newest that fit in memory, every
VALIDATION_PERIOD-th held back for validation), read and weighted by recency, and the patches
and gain estimate drawn from them.

With sCMOS camera maps (`camera`), frames are equalised as they are read and every patch carries
their pixels' read-noise variance as one more channel (`core.camera`, `core.training.Training`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from pn2v_live.core.context import Context, Windows
from pn2v_live.core.model import Denoiser, new_denoiser, normalisation_of
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.patches import sample_patches
from pn2v_live.core.quality import GainEstimate, denoised_gain
from pn2v_live.core.registration import Registration, Shifts
from pn2v_live.core.training import Training
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.registry import ModelRegistry

VALIDATION_PERIOD = 8  # frames t with t % 8 == 3 are held back for validation
VALIDATION_PHASE = 3
VALIDATION_PATCHES = 32
WINDOW_FRAMES = 400  # newest frames a round samples from ...
WINDOW_BYTES = 512 * 2**20  # ... as long as they fit in this much memory
HALF_LIFE_FRAMES = 100  # a frame this much older than the newest is drawn half as often
MIN_SIDE = 8  # smallest frame side a patch (a multiple of 8) fits in

Window = tuple[list[int], list[int]]  # (training, held-back) frame numbers a round reads


@dataclass
class Series:
    """The frames a round reads from one acquisition: `frames` in time order (None where not
    stored or unreadable), and the positions in it of the training and held-back frames; with
    camera maps, `variance` is their pixels' (Y, X) read-noise variance, a last channel of every
    patch; `registration` registers its windows (shared with later rounds' series)."""

    frames: list[np.ndarray | None]
    trained: list[int]
    held_back: list[int]
    variance: np.ndarray | None = None
    registration: Registration = field(default_factory=Registration)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return next(f for f in self.frames if f is not None).shape

    def new_denoiser(self, context: Context, k: int) -> Denoiser:
        """A new PN2V denoiser of `context` with `k` prior samples, normalised to these frames."""
        mean, std = normalisation_of([f for f in self.frames if f is not None])
        return new_denoiser("pn2v", mean, std, k=k, context=context)

    def training_windows(self, context: Context) -> Windows:
        return self._windows(context, self.trained)

    def _windows(self, context: Context, centres: list[int]) -> Windows:
        """The windows of `context` at `centres`, with the variance channel last if any."""
        truths = None if self.variance is None else [[self.variance] * len(self.frames)]
        centred = [(0, t) for t in centres]
        return Windows([self.frames], context, centred, truths, [self.registration])

    def estimated_gain(
        self, training: Training, noise_model: NoiseModel, patch: int
    ) -> GainEstimate:
        """The ground-truth-free gain over raw of `training`'s model on the held-back frames:
        from frame pairs (`core.quality.denoised_gain`) where the frame after a held-back
        frame's window is stored, else from the blind spot (`Training.estimated_gain`)."""
        context = training.denoiser.context
        with_next = Context(context.before, context.after + 1)
        windows = self._windows(with_next, self.held_back)
        batch = sample_patches(windows, VALIDATION_PATCHES, patch, np.random.default_rng(0))
        variance = None
        if self.variance is not None:
            batch, variance = batch[:, :-1], batch[:, -1]
        try:
            return denoised_gain(training.denoiser, noise_model, batch, read_variance=variance)
        except ValueError:  # no held-back frame has its next frame yet
            return training.estimated_gain(self.validation_batch(training.denoiser, patch))

    def validation_batch(self, denoiser: Denoiser, patch: int) -> torch.Tensor:
        """VALIDATION_PATCHES patches of the held-back frames in `denoiser`'s window; the same
        frames, places and orientations for every window, so losses of different models
        compare."""
        windows = self._windows(denoiser.context, self.held_back)
        return sample_patches(windows, VALIDATION_PATCHES, patch, np.random.default_rng(0))


def usable_window(acquisition: Acquisition) -> Window | None:
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


def enough_for_first_model(acquisition: Acquisition, frames: int) -> bool:
    """Whether `acquisition` has `frames` frames stored for a first model, or all there will
    be (closed)."""
    return acquisition.closed or acquisition.frame_count >= frames


def read_series(
    acquisition: Acquisition,
    window: Window,
    read_raw: Callable[[Acquisition, int], np.ndarray | None],
    camera: CameraFrames,
    shifts: Shifts,
) -> tuple[Series, np.ndarray]:
    """The frames of `window` (see `usable_window`) as a `Series` (equalised, with their
    read-noise variance, with camera maps), and the recency weights of its training frames; a
    frame `read_raw` cannot read (None) is left out. Its windows are registered with `shifts`.
    """
    registration = shifts.series(acquisition.identity)
    trained, held_back = window
    first, last = min(trained + held_back), max(trained + held_back)
    frames = [None] * (last - first + 1)
    variance = None
    for t in trained + held_back:
        raw = read_raw(acquisition, t)
        if raw is not None:
            frames[t - first], variance = camera.inputs(acquisition, raw)
    trained = [t - first for t in trained if frames[t - first] is not None]
    held_back = [t - first for t in held_back if frames[t - first] is not None]
    ages = (last - first) - np.asarray(trained, dtype=float)
    series = Series(frames, trained, held_back, variance, registration.from_frame(first))
    return series, 0.5 ** (ages / HALF_LIFE_FRAMES)


def promoted_loss(
    registry: ModelRegistry,
    series: Series,
    patch: int,
    noise_model: NoiseModel,
    device: torch.device,
    bf16: bool | None,
) -> float | None:
    """The promoted model's loss on the validation batch of `series` (None when nothing is
    promoted yet, or when it is not a PN2V model)."""
    if registry.current() is None:
        return None
    denoiser, _ = registry.load()
    denoiser.net.to(device)
    if denoiser.mode != "pn2v":
        return None  # an initial N2V/supervised model: any PN2V model replaces it
    training = Training(denoiser, noise_model, bf16=bf16)
    return training.validation_loss(series.validation_batch(denoiser, patch))
