"""Choosing a denoiser's temporal context by held-out validation loss, then training it on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pn2v_live.core.context import SPATIAL, Context, Windows
from pn2v_live.core.model import Denoiser
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.training import train

BASE_SHARE = 0.25  # of a budget that `train_choosing_context` spends on the shared start
PILOT_SHARE = 0.25  # ... and on trying the candidates from it


def train_choosing_context(
    make_denoiser: Callable[[Context], Denoiser],
    series: Sequence[Sequence[np.ndarray]],
    candidates: Sequence[Context],
    noise_model: NoiseModel | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    truths: Sequence[Sequence[np.ndarray]] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> tuple[Denoiser, dict[str, float]]:
    """Choose the temporal context by held-out validation loss, then train it to the budget.

    A single-frame model `make_denoiser(SPATIAL)` trains for BASE_SHARE of the budget (steps or
    minutes) and goes on as the single-frame candidate; each temporal candidate starts fresh
    from `make_denoiser`, a residual window that begins as the mean of its other frames, so it
    does not need those steps to be competitive (and a moving scene, whose mean smears, keeps
    the single frame's head start). Each candidate trains for an equal part of PILOT_SHARE; all
    are validated on the same held-back frames and pixels (Eq. 7 with the whole window
    visible), so their losses compare; a PN2V candidate's after its spread is fitted, as it will
    denoise (before the fit, a prior far too wide loses more than one nearly right, which favoured
    the temporal windows on a drifting sample). The best one trains on for the rest of the budget.
    `series` are (T, Y, X) raw stacks (one per acquisition or file), `truths` their ground truth
    per frame for "supervised"; `options` go to `train`. Returns the trained denoiser and each
    candidate's best validation loss keyed by "A:B".
    """
    share = PILOT_SHARE / len(candidates)
    base_steps = None if steps is None else max(1, round(steps * BASE_SHARE))
    pilot_steps = None if steps is None else max(1, round(steps * share))
    base = make_denoiser(SPATIAL)
    train(base, Windows(series, SPATIAL, truths=truths), noise_model, base_steps,
          None if minutes is None else minutes * BASE_SHARE, **options)  # fmt: skip
    losses, best = {}, None
    for context in candidates:
        denoiser = base if context == SPATIAL else make_denoiser(context)
        frames = Windows(series, context, truths=truths)
        history = train(denoiser, frames, noise_model, pilot_steps,
                        None if minutes is None else minutes * share, **options)  # fmt: skip
        losses[str(context)] = compared_loss(history)
        if best is None or losses[str(context)] < losses[str(best.context)]:
            best = denoiser
        if log is not None:
            log(f"context {context}: validation loss {losses[str(context)]:.4f}")
    spent = base_steps + pilot_steps * len(candidates) if steps is not None else 0
    rest_steps = None if steps is None else max(1, steps - spent)
    rest_minutes = None if minutes is None else minutes * (1 - BASE_SHARE - PILOT_SHARE)
    frames = Windows(series, best.context, truths=truths)
    train(best, frames, noise_model, rest_steps, rest_minutes, **options)
    return best, losses


def compared_loss(history: Sequence[dict[str, Any]]) -> float:
    """The validation loss a candidate is judged by: after the PN2V prior's spread fit where
    there was one, else the best during training."""
    last = history[-1]
    if "fitted_validation_loss" in last:
        return last["fitted_validation_loss"]
    return min(record["validation_loss"] for record in history)
