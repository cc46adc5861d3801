"""Temporal context: the frames around frame t that the U-Net sees beside t itself.

A window `Context(before, after)` feeds frames t−before … t+after of one acquisition to the
network as input channels, frame t at channel `before`. The Noise2Void blind spot is in frame t
only (see `masking.n2v_mask`), so Eq. 7 and Eq. 10 are unchanged; `Context(0, 0)` is the
single-frame network of the paper.

A frame the window cannot have (before the first frame, after the last, not stored yet, or
hidden to make a live twin) is NaN in the window and becomes the data mean (0 after
normalisation) in the network's input; a window never reads another frame in its place, so no
frame's pixel can stand in for frame t's own value. Training hides random parts of the window
(`visible_channels`), so one network denoises with its whole window (the refined twin), with the
frames after t hidden (the causal live twin) and at the edges of an acquisition.

Every frame of a window is registered onto frame t (`core.registration`): a sample drifting
across the field of view stays in place in the window, so the context helps it as it helps a
static one; what moves within the field (cells, not the stage) is left to the window choice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pn2v_live.core.registration import Registration

if TYPE_CHECKING:  # torch is imported where used, so the CLI can parse contexts without it
    import torch

KEEP_PAST = 0.75  # share of training patches that see every earlier frame of their window ...
KEEP_FUTURE = 0.5  # ... and every later one; the others see a random shorter part of that side


@dataclass(frozen=True, order=True)
class Context:
    """Frames t−before … t+after as channels; frame t is channel `before`."""

    before: int = 0
    after: int = 0

    def __post_init__(self) -> None:
        if self.before < 0 or self.after < 0:
            raise ValueError(f"context {self.before}:{self.after} must not be negative")

    @classmethod
    def parse(cls, text: str) -> Context:
        """ "A:B" → Context(A, B); "A" alone means A:A."""
        match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", text)
        if match is None:
            raise ValueError(f"context must look like A:B (frames before:after t), not {text!r}")
        before = int(match[1])
        return cls(before, int(match[2]) if match[2] is not None else before)

    def __str__(self) -> str:
        return f"{self.before}:{self.after}"

    @property
    def channels(self) -> int:
        return self.before + 1 + self.after

    @property
    def causal(self) -> Context:
        """The same window with the frames after t hidden (what a live twin can have)."""
        return Context(self.before, 0)

    def frame_numbers(self, t: int) -> range:
        """Frame numbers t−before … t+after, in channel order."""
        return range(t - self.before, t + self.after + 1)


SPATIAL = Context(0, 0)
CANDIDATES = (SPATIAL, Context(1, 1), Context(3, 3), Context(8, 2))  # what "auto" chooses from


def window(
    frames: Sequence[np.ndarray | None] | Mapping[int, np.ndarray],
    t: int,
    context: Context,
    visible: Context | None = None,
    registration: Registration | None = None,
) -> np.ndarray:
    """Frames t−before … t+after of `frames` (a time series of (Y, X) frames, None where
    missing, or a {t: frame} mapping) as one (channels, Y, X) float32 array, every frame but t
    registered onto frame t (`registration`, which remembers the shifts of one series; a new
    one by default); frames outside `frames`, missing, or outside `visible` (default: the whole
    window), and pixels a registered frame does not reach, are NaN."""
    visible = visible or context
    registration = registration or Registration()
    if isinstance(frames, Mapping):
        lookup = frames.get
    else:
        lookup = lambda number: frames[number] if 0 <= number < len(frames) else None  # noqa: E731
    centre = np.asarray(frames[t], dtype=np.float32)
    result = np.full((context.channels, *centre.shape), np.nan, np.float32)
    for channel, number in enumerate(context.frame_numbers(t)):
        frame = lookup(number) if -visible.before <= number - t <= visible.after else None
        if frame is not None and number != t:
            result[channel] = registration.align(np.asarray(frame, np.float32), number, centre, t)
        elif frame is not None:
            result[channel] = centre
    return result


class Windows(Sequence):
    """Lazy training windows of one or more time series (acquisitions, files): item i is
    `window(series[s], t, context)` for the i-th centre (s, t), with that frame's ground truth
    appended as a last channel when `truths` (one sequence per series) are given; each series
    is registered with its own `registrations` entry (new ones by default).

    Keeps one copy of the frames however wide the window, so a round can draw from hundreds of
    frames with several channels each; a window never reaches into another series.
    """

    def __init__(
        self,
        series: Sequence[Sequence[np.ndarray | None]],
        context: Context,
        centres: Sequence[tuple[int, int]] | None = None,
        truths: Sequence[Sequence[np.ndarray]] | None = None,
        registrations: Sequence[Registration] | None = None,
    ):
        self.series, self.context, self.truths = series, context, truths
        if centres is None:
            centres = [(s, t) for s, frames in enumerate(series) for t in range(len(frames))]
        self.centres = list(centres)
        self.registrations = registrations or [Registration() for _ in series]

    def __len__(self) -> int:
        return len(self.centres)

    def __getitem__(self, index: int) -> np.ndarray:
        s, t = self.centres[index]
        stacked = window(self.series[s], t, self.context, registration=self.registrations[s])
        if self.truths is None:
            return stacked
        return np.concatenate([stacked, np.asarray(self.truths[s][t], np.float32)[None]])

    def subset(self, positions: Sequence[int]) -> Windows:
        """The windows at `positions` of this sequence (sharing the frames)."""
        picked = [self.centres[p] for p in positions]
        return Windows(self.series, self.context, picked, self.truths, self.registrations)


def visible_channels(
    batch: int, context: Context, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, channels) 0/1 float mask of the frames each training patch may see.

    Frame t is always visible. Each side of the window is whole with probability KEEP_PAST
    (before t) or KEEP_FUTURE (after t), otherwise cut to a uniformly drawn shorter depth
    (0 … n−1 frames), so the network learns the live (causal) twin and the acquisition's edges.
    """
    import torch

    offsets = torch.arange(-context.before, context.after + 1)
    past = _depths(batch, context.before, KEEP_PAST, generator)
    future = _depths(batch, context.after, KEEP_FUTURE, generator)
    seen = (offsets >= -past[:, None]) & (offsets <= future[:, None])
    return seen.float()


def _depths(batch: int, n: int, keep: float, generator: torch.Generator | None) -> torch.Tensor:
    """How many frames of an n-frame side each patch sees: n with probability `keep`, else a
    uniform draw from 0 … n−1."""
    import torch

    if n == 0:
        return torch.zeros(batch, dtype=torch.long)
    whole = torch.rand(batch, generator=generator) < keep
    shorter = torch.randint(0, n, (batch,), generator=generator)
    return torch.where(whole, torch.full_like(shorter, n), shorter)
