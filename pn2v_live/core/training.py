"""Training: patch sampling, one optimiser step per `Training.step`, and the whole `train` loop.

Self-supervised modes ("pn2v", "n2v") mask pixels Noise2Void-style and evaluate the head and the
loss at the masked pixels only; "supervised" regresses the whole patch onto ground truth.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pn2v_live.core.losses import mse, pn2v_loss
from pn2v_live.core.masking import DEFAULT_FRACTION, n2v_mask
from pn2v_live.core.model import Denoiser
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.unet import INFERENCE_MEMORY_FORMAT

VALIDATION_SEED = 12345


def sample_patches(
    frames: Sequence[np.ndarray],
    n: int,
    size: int,
    rng: np.random.Generator,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """`n` random square patches (n, C, size, size) float32, randomly rotated by 90° and flipped.

    `frames` are (Y, X) or (C, Y, X) arrays (C aligned channels, e.g. raw and ground truth);
    a frame is drawn with probability proportional to `weights` (uniform when None).
    """
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    patches = np.empty((n, *_channels_first(frames[0]).shape[:1], size, size), np.float32)
    for i, index in enumerate(rng.choice(len(frames), size=n, p=p)):
        frame = _channels_first(frames[index])
        height, width = frame.shape[1:]
        if height < size or width < size:
            raise ValueError(f"patch size {size} exceeds frame size {height}×{width}")
        y = rng.integers(0, height - size + 1)
        x = rng.integers(0, width - size + 1)
        patch = frame[:, y : y + size, x : x + size]
        patch = np.rot90(patch, k=int(rng.integers(4)), axes=(1, 2))
        patches[i] = patch[:, :, ::-1] if rng.integers(2) else patch
    return torch.from_numpy(patches)


def _channels_first(frame: np.ndarray) -> np.ndarray:
    return frame[np.newaxis] if frame.ndim == 2 else frame


class Training:
    """Optimiser state for one denoiser: Adam, at the learning rate each `step` is given.

    Batches are (B, 1, H, W) raw ADU patches, or (B, 2, H, W) raw + ground truth for
    "supervised". Runs where the denoiser's parameters are; the U-Net body in bfloat16 when
    `bf16` (None: where the device computes it natively), head and likelihood in float32.
    Lays the U-Net out in `training_memory_format` (`train` restores `INFERENCE_MEMORY_FORMAT`).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        noise_model: NoiseModel | None = None,
        lr: float = 4e-4,
        fraction: float = DEFAULT_FRACTION,
        seed: int = 0,
        bf16: bool | None = None,
    ):
        if denoiser.mode == "pn2v" and noise_model is None:
            raise ValueError("pn2v training needs a noise model")
        self.denoiser, self.noise_model, self.fraction = denoiser, noise_model, fraction
        self.bf16 = bf16
        denoiser.net.use_memory_format(
            training_memory_format(denoiser.device, denoiser.body_in_bf16(bf16))
        )
        self.optimizer = torch.optim.Adam(denoiser.net.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)

    def loss(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The mode's loss on one batch (see class docstring for shapes)."""
        d = self.denoiser
        batch = batch.to(d.device, non_blocking=True)
        raw = batch[:, :1]
        if d.mode == "supervised":
            with d.body_autocast(self.bf16):
                prediction = d.net(d.normalise(raw))
            return mse(prediction.float(), d.normalise(batch[:, 1:2]))
        masked, (b, y, x) = n2v_mask(raw, self.fraction, generator=generator)
        with d.body_autocast(self.bf16):
            features = d.net.body(d.normalise(masked))
        features = features[b, :, y, x].float()  # (P, F) at the masked pixels only
        observations = raw[b, 0, y, x]
        if d.mode == "n2v":
            head = d.net.head
            prediction = features @ head.weight.flatten(1).T + head.bias
            return mse(prediction[:, 0], d.normalise(observations))
        weight, bias = d.head_in_adu()
        samples = torch.addmm(bias, features, weight.T)  # (P, K) ADU
        return pn2v_loss(samples, observations, self.noise_model)

    def step(self, batch: torch.Tensor, lr: float | None = None) -> float:
        """One Adam update on `batch`, at learning rate `lr` from now on when given; returns the
        loss before the update."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.denoiser.net.train()
        loss = self.loss(batch, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def validation_loss(self, batch: torch.Tensor) -> float:
        """Loss on `batch` with a fixed mask, so values are comparable between calls."""
        self.denoiser.net.eval()
        return float(self.loss(batch, torch.Generator().manual_seed(VALIDATION_SEED)))


def train(
    denoiser: Denoiser,
    frames: Sequence[np.ndarray],
    noise_model: NoiseModel | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int | None = None,
    patch_size: int = 96,
    lr: float = 4e-4,
    val_fraction: float = 0.1,
    validate_every: int = 25,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
    bf16: bool | None = None,
) -> list[dict[str, Any]]:
    """Train until `steps` updates or `minutes` of wall time (whichever comes first).

    `frames` are (Y, X) raw frames, or (2, Y, X) raw + ground truth for "supervised". Frames
    are split into training and validation sets (at least one of each when there are ≥ 2).
    The learning rate falls from `lr` to 0 along a cosine over the budget (whichever of steps
    and minutes runs out first), so the run ends on a quiet average instead of one noisy Adam
    step; every `validate_every` steps the validation loss is measured and the best weights so
    far are kept. `bf16`: see `Training`. The denoiser ends with the best weights, laid out
    channels-last for inference; returns the history (also appended to `denoiser.history`).
    `batch_size` None: `default_batch_size`.
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes")
    batch_size = batch_size or default_batch_size(denoiser.device)
    multiple = denoiser.net.size_multiple
    if patch_size % multiple:
        raise ValueError(
            f"patch size {patch_size} must be a multiple of {multiple}: the U-Net halves it "
            f"{denoiser.net.depth - 1} times"
        )
    rng = np.random.default_rng(seed)
    train_frames, val_frames = split_frames(frames, val_fraction, patch_size, rng)
    val_batch = sample_patches(val_frames, max(batch_size, 16), patch_size, rng)
    training = Training(denoiser, noise_model, lr=lr, seed=seed, bf16=bf16)
    started = time.monotonic()
    best_loss, best_state = float("inf"), None
    history, losses, step = [], [], 0
    while (done := budget_used(step, steps, time.monotonic() - started, minutes)) < 1:
        batch = sample_patches(train_frames, batch_size, patch_size, rng)
        losses.append(training.step(batch, cosine_rate(lr, done)))
        step += 1
        if step % validate_every == 0 or step == steps:
            val_loss = training.validation_loss(val_batch)
            record = {
                "step": step,
                "training_loss": float(np.mean(losses)),
                "validation_loss": val_loss,
                "lr": training.optimizer.param_groups[0]["lr"],
                "batch_size": batch_size,
                "time": time.time(),
            }
            history.append(record)
            losses = []
            if val_loss < best_loss:
                best_loss, best_state = val_loss, copy.deepcopy(denoiser.net.state_dict())
            if progress is not None:
                progress(record)
    if best_state is not None:
        denoiser.net.load_state_dict(best_state)
    denoiser.net.use_memory_format(INFERENCE_MEMORY_FORMAT)
    denoiser.history.extend(history)
    return history


def default_batch_size(device: torch.device) -> int:
    """Patches per step where none is given: 16 on a GPU, which computes 16 patches in about the
    time of one, and 4 on a CPU, whose step time grows with its patches, so that in the same
    time PN2V takes four times as many smaller steps (on the FMD data 0.55 dB better drift-
    corrected at the step counts of 30 minutes on a 2-core AMD EPYC, trained on a GPU; 0.25 dB
    trained on the EPYC itself, one seed; see the README's Performance section)."""
    return 16 if device.type == "cuda" else 4


def training_memory_format(device: torch.device, bf16: bool) -> torch.memory_format:
    """Layout the U-Net trains fastest in: channels-first where its body trains in float32 on a
    CPU (there oneDNN's channels-last backward pass takes about twice as long on 96² patches,
    and a step of 4 patches about 20 % longer, on a 2-core AMD EPYC), channels-last on CUDA and
    in bfloat16."""
    if device.type == "cpu" and not bf16:
        return torch.contiguous_format
    return torch.channels_last


def cosine_rate(lr: float, done: float) -> float:
    """Learning rate once the fraction `done` (0 … 1) of a budget is used: `lr` → 0 along a
    half cosine."""
    return lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))


def budget_used(step: int, steps: int | None, seconds: float, minutes: float | None) -> float:
    """Fraction of the training budget used: the larger of steps and wall time (0 … ≥ 1)."""
    by_steps = step / steps if steps is not None else 0.0
    by_time = seconds / (60 * minutes) if minutes is not None else 0.0
    return max(by_steps, by_time)


def split_frames(
    frames: Sequence[np.ndarray], val_fraction: float, patch_size: int, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Hold back about `val_fraction` of the frames (≥ 1 when there are ≥ 2 frames).

    With a single frame, a bottom strip of rows (val_fraction of the height, at least one
    patch high) is held back instead.
    """
    frames = list(frames)
    if len(frames) >= 2:
        order = rng.permutation(len(frames))
        n_val = max(1, round(val_fraction * len(frames)))
        return [frames[i] for i in order[n_val:]], [frames[i] for i in order[:n_val]]
    frame = frames[0]
    height = frame.shape[-2]
    strip = max(round(val_fraction * height), patch_size)
    if height - strip < patch_size:
        raise ValueError(
            f"one {height}-row frame cannot hold {patch_size}-pixel training and validation "
            "patches: give more frames or a smaller patch size"
        )
    return [frame[..., : height - strip, :]], [frame[..., height - strip :, :]]
