"""Training: one optimiser step per `Training.step`, and the whole `train` loop.

Patches come from `core.patches`; choosing a temporal context first is `core.context_choice`.

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

from pn2v_live.core.context import visible_channels
from pn2v_live.core.losses import mse, pn2v_loss
from pn2v_live.core.masking import DEFAULT_FRACTION, n2v_mask
from pn2v_live.core.model import Denoiser
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.patches import sample_patches, split_frames
from pn2v_live.core.quality import GainEstimate, estimate_gain
from pn2v_live.core.unet import INFERENCE_MEMORY_FORMAT

VALIDATION_SEED = 12345
# PN2V training adds this weight × the Noise2Void loss of the prior mean (normalised units) to
# Eq. 7: both are minimised by the right prior mean, which Eq. 7 alone learns slowly (its
# gradient hardly depends on the samples' spread below the noise); the spread is then fitted
# by Eq. 7 alone (`Training.fit_prior_spread`).
MEAN_WEIGHT = 1.0
SPREAD_SCALES = np.geomspace(0.02, 2.0, 41)  # the prior spreads `fit_prior_spread` tries
SPREAD_CHUNK = 2048  # pixels per likelihood evaluation of `best_spread`


class Training:
    """Optimiser state for one denoiser: Adam, at the learning rate each `step` is given.

    Batches are (B, C, H, W) raw ADU patches of the denoiser's temporal window (C = its
    channels, frame t at channel `context.before`, NaN where a frame is missing), with the ground
    truth as one more channel for "supervised". Training steps hide random parts of the window
    (`context.visible_channels`); validation sees it whole. Runs where the denoiser's parameters
    are; the U-Net body in bfloat16 when
    `bf16` (None: where the device computes it natively), head and likelihood in float32.
    Lays the U-Net out in `training_memory_format` (`train` restores `INFERENCE_MEMORY_FORMAT`).
    PN2V steps minimise Eq. 7 plus `mean_weight` × the Noise2Void loss of the prior mean;
    validation is Eq. 7 alone. With a camera-maps noise model, PN2V batches carry one more
    channel: the pixels' read-noise variance (`NoiseModel.camera_inputs`).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        noise_model: NoiseModel | None = None,
        lr: float = 4e-4,
        fraction: float = DEFAULT_FRACTION,
        seed: int = 0,
        bf16: bool | None = None,
        mean_weight: float = MEAN_WEIGHT,
    ):
        if denoiser.mode == "pn2v" and noise_model is None:
            raise ValueError("pn2v training needs a noise model")
        self.denoiser, self.noise_model, self.fraction = denoiser, noise_model, fraction
        self.bf16, self.mean_weight = bf16, mean_weight
        denoiser.net.use_memory_format(
            training_memory_format(denoiser.device, denoiser.body_in_bf16(bf16))
        )
        self.optimizer = torch.optim.Adam(denoiser.net.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)

    def loss(
        self,
        batch: torch.Tensor,
        generator: torch.Generator | None = None,
        hide: bool = False,
        training: bool = False,
    ) -> torch.Tensor:
        """The mode's loss on one batch (see class docstring for shapes); `hide`: draw which
        frames of the window each patch sees from `generator`; `training`: with the prior-mean
        term of PN2V training steps."""
        d = self.denoiser
        batch = batch.to(d.device, non_blocking=True)
        channels, centre = d.context.channels, d.context.before
        raw = batch[:, :channels]
        if d.mode == "supervised":
            inputs, offset = self._inputs(raw, generator, hide)
            with d.body_autocast(self.bf16):
                prediction = d.net(inputs).float() + offset[:, None] / d.std
            return mse(prediction, d.normalise(batch[:, channels : channels + 1]))
        features, (b, y, x), offsets = self.masked_features(raw, generator, hide)
        observations = raw[b, centre, y, x]
        if d.mode == "n2v":
            head = d.net.head
            prediction = features @ head.weight.flatten(1).T + head.bias
            return mse(prediction[:, 0] + offsets / d.std, d.normalise(observations))
        weight, bias = d.head_in_adu()
        samples = torch.addmm(bias, features, weight.T) + offsets[:, None]  # (P, K) ADU
        read_variance = pixel_values(batch, channels, (b, y, x))
        loss = pn2v_loss(samples, observations, self.noise_model, read_variance)
        if training and self.mean_weight:
            loss = loss + self.mean_weight * mse(samples.mean(dim=1) / d.std, observations / d.std)
        return loss

    def masked_features(
        self, raw: torch.Tensor, generator: torch.Generator | None = None, hide: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Noise2Void: mask frame t of (B, C, H, W) raw patches, run the body; the (P, F) float32
        features at the P masked pixels, whose own values never reach them, their (b, y, x)
        indices and the (P,) ADU `Denoiser.prior_offset` there."""
        d = self.denoiser
        masked, (b, y, x) = n2v_mask(
            raw, self.fraction, generator=generator, channel=d.context.before
        )
        inputs, offset = self._inputs(masked, generator, hide)
        with d.body_autocast(self.bf16):
            features = d.net.body(inputs)
        return features[b, :, y, x].float(), (b, y, x), offset[b, y, x]

    def _inputs(
        self, raw: torch.Tensor, generator: torch.Generator | None, hide: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised network input, with `hide` the hidden frames of each patch set to 0; and
        the (B, H, W) ADU prior offset of the frames it shows (`Denoiser.prior_offset`)."""
        d = self.denoiser
        inputs, seen = d.normalise(raw), None
        if hide and raw.shape[1] > 1:
            seen = visible_channels(len(raw), d.context, generator).to(inputs.device)
            inputs = inputs * seen[:, :, None, None]
        return inputs, d.prior_offset(raw, seen)

    def step(self, batch: torch.Tensor, lr: float | None = None) -> float:
        """One Adam update on `batch`, at learning rate `lr` from now on when given; returns the
        loss before the update."""
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.denoiser.net.train()
        loss = self.loss(batch, self.generator, hide=True, training=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def validation_loss(self, batch: torch.Tensor) -> float:
        """Loss on `batch` with a fixed mask, so values are comparable between calls."""
        self.denoiser.net.eval()
        return float(self.loss(batch, torch.Generator().manual_seed(VALIDATION_SEED)))

    @torch.no_grad()
    def fit_prior_spread(self, batch: torch.Tensor, draws: int = 4) -> float:
        """Scale a PN2V prior's samples about their mean by the factor of `SPREAD_SCALES` that
        minimises Eq. 7 on `batch` of held-back patches (`draws` fixed masks), in place in the
        head (no cost at inference); returns the factor (1: unchanged).

        The marginal likelihood is maximal for the prior that matches the data, so this one-
        parameter fit sets the spread that the MMSE (Eq. 10) weighs against the pixel's own
        value, which training alone leaves too wide or too narrow.
        """
        d = self.denoiser
        samples, observations, _, variance = self._held_back_heads(batch, *d.head_in_adu(), draws)
        scale = best_spread(samples, observations, self.noise_model, read_variance=variance)
        head = d.net.head
        mean_weight = head.weight.mean(dim=0, keepdim=True)
        mean_bias = head.bias.mean(dim=0, keepdim=True)
        head.weight.copy_(mean_weight + scale * (head.weight - mean_weight))
        head.bias.copy_(mean_bias + scale * (head.bias - mean_bias))
        return scale

    @torch.no_grad()
    def estimated_gain(
        self, batch: torch.Tensor, noise_model: NoiseModel | None = None, draws: int = 4
    ) -> GainEstimate:
        """The ground-truth-free PSNR gain over raw (`core.quality`) of a "pn2v" or "n2v" model
        on `batch` of held-back patches, from `draws` fixed masks of it; `noise_model` defaults
        to the one trained with (an "n2v" model needs one given)."""
        d = self.denoiser
        if d.mode == "supervised":
            raise ValueError("a supervised model has no blind spot to estimate its gain from")
        weight, bias = d.head_in_adu()  # the prior mean is the mean of the K samples' heads
        weight, bias = weight.mean(dim=0, keepdim=True), bias.mean(dim=0, keepdim=True)
        means, observations, patches, _ = self._held_back_heads(batch, weight, bias, draws)
        return estimate_gain(means[:, 0], observations, patches, noise_model or self.noise_model)

    def _held_back_heads(
        self, batch: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, draws: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Over `draws` fixed masks of `batch` (held-back patches): the head `features @
        weight.T + bias` (P, outputs, in ADU) at the masked pixels, their raw values (P,), the
        patch each lies in (P,), and their read-noise variance (P,; None without camera maps)."""
        d = self.denoiser
        d.net.eval()
        batch = batch.to(d.device)
        raw = batch[:, : d.context.channels]
        heads, observations, patches, variances = [], [], [], []
        for draw in range(draws):
            generator = torch.Generator().manual_seed(VALIDATION_SEED + draw)
            features, (b, y, x), offsets = self.masked_features(raw, generator)
            heads.append(torch.addmm(bias, features, weight.T) + offsets[:, None])
            observations.append(raw[b, d.context.before, y, x])
            patches.append(b)
            variances.append(pixel_values(batch, d.context.channels, (b, y, x)))
        variance = None if variances[0] is None else torch.cat(variances)
        return torch.cat(heads), torch.cat(observations), torch.cat(patches), variance


def best_spread(
    samples: torch.Tensor,
    observations: torch.Tensor,
    noise_model: NoiseModel,
    scales: Sequence[float] = SPREAD_SCALES,
    read_variance: torch.Tensor | None = None,
    stride: int = 4,
    chunk: int = SPREAD_CHUNK,
) -> float:
    """The factor of `scales` for which the (P, K) ADU prior samples, scaled about their mean,
    give the lowest Eq. 7 loss for the (P,) observations (the prior's maximum-likelihood
    spread); 1 when no factor does better than the samples as they are. `read_variance`: see
    `pn2v_loss`.

    Searched coarse to fine: every `stride`-th factor, then the factors around the best of
    those, so a round evaluates the loss (P·K likelihoods) about a third as often as for every
    factor; the loss as a function of the spread has one minimum at this resolution. The loss
    is summed over `chunk` pixels at a time, so its temporaries are (chunk, K), not (P, K)."""
    mean = samples.mean(dim=1, keepdim=True)
    rows = [slice(start, start + chunk) for start in range(0, len(samples), chunk)]
    losses: dict[float, float] = {}

    def loss_at(factor: float) -> float:
        if factor not in losses:
            total = 0.0
            for r in rows:
                scaled = mean[r] + factor * (samples[r] - mean[r])
                variance = None if read_variance is None else read_variance[r]
                loss = pn2v_loss(scaled, observations[r], noise_model, variance)
                total += float(loss) * len(scaled)
            losses[factor] = total / len(samples)
        return losses[factor]

    factors = [float(s) for s in scales]
    loss_at(1.0)  # first, so that a tie keeps the samples as they are
    coarse = sorted({*range(0, len(factors), stride), len(factors) - 1})
    best = min(coarse, key=lambda i: loss_at(factors[i]))
    for i in range(max(0, best - stride + 1), min(len(factors), best + stride)):
        loss_at(factors[i])
    return min(losses, key=losses.__getitem__)


def pixel_values(
    batch: torch.Tensor, channels: int, where: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor | None:
    """The (P,) values at the (b, y, x) pixels of the channel after a PN2V batch's `channels`
    frames (the pixels' read-noise variance with camera maps); None when there is none."""
    if batch.shape[1] <= channels:
        return None
    b, y, x = where
    return batch[b, channels, y, x]


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

    `frames` are (Y, X) raw frames, or (2, Y, X) raw + ground truth for "supervised"; for a
    denoiser with a temporal context, `Windows` of that context. Frames are split into
    training and validation sets (at least one of each when there are ≥ 2).
    The learning rate falls from `lr` to 0 along a cosine over the budget (whichever of steps
    and minutes runs out first), so the run ends on a quiet average instead of one noisy Adam
    step; every `validate_every` steps the validation loss is measured and the best weights so
    far are kept; a PN2V prior's spread is then fitted (`Training.fit_prior_spread`, the factor
    in the last record's "prior_spread", the validation loss after it "fitted_validation_loss").
    `bf16`: see `Training`. The denoiser ends with the best weights, laid out channels-last for
    inference; returns the history (also appended to `denoiser.history`).
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
    earlier = total_steps(denoiser.history)  # steps of earlier calls on this denoiser
    best_loss, best_state = float("inf"), None
    history, losses, step = [], [], 0
    while (done := budget_used(step, steps, time.monotonic() - started, minutes)) < 1:
        batch = sample_patches(train_frames, batch_size, patch_size, rng)
        losses.append(training.step(batch, cosine_rate(lr, done)))
        step += 1
        last = budget_used(step, steps, time.monotonic() - started, minutes) >= 1
        if step % validate_every == 0 or last:
            val_loss = training.validation_loss(val_batch)
            record = {
                "step": step,
                "total_steps": earlier + step,
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
    if denoiser.mode == "pn2v" and history:
        history[-1]["prior_spread"] = training.fit_prior_spread(val_batch)
        history[-1]["fitted_validation_loss"] = training.validation_loss(val_batch)
    denoiser.net.use_memory_format(INFERENCE_MEMORY_FORMAT)
    denoiser.history.extend(history)
    return history


def total_steps(history: Sequence[dict[str, Any]]) -> int:
    """Optimiser steps over every `train` call recorded in a denoiser's `history`."""
    if not history:
        return 0
    return history[-1].get("total_steps", history[-1]["step"])


def default_batch_size(device: torch.device) -> int:
    """Patches per step where none is given: 16 on a GPU, which computes 16 patches in about the
    time of one, and 4 on a CPU, whose step time grows with its patches, so that in the same
    time PN2V takes four times as many smaller steps, and PN2V is still improving after a few
    hundred steps (the measurements: docs/benchmarks.md, "4 patches per step on a CPU")."""
    return 16 if device.type == "cuda" else 4


def training_memory_format(device: torch.device, bf16: bool) -> torch.memory_format:
    """Layout the U-Net trains fastest in: channels-first where its body trains in float32 on a
    CPU (there oneDNN's channels-last backward pass is the slower one; docs/benchmarks.md),
    channels-last on CUDA and in bfloat16."""
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
