"""Whether the daemon keeps up under a live replay: when its training rounds completed, how
far inference fell behind, and when the backlog was worked off after the stream ended.

Sampled from the daemon's /metrics at every poll of the replay (`bench --part live`): the
counter of training rounds that completed (promoted or kept, not failed) and the inference
backlog gauge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from pn2v_live.service.bench.daemon_metrics import read_metrics, total


@dataclass
class Pace:
    """Samples of (s after the first frame, training rounds so far, backlog in frames)."""

    url: str
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    misses: int = 0  # polls the endpoint did not answer (a busy daemon)

    def take(self, t_s: float) -> None:
        try:
            samples = read_metrics(self.url)
        except (OSError, ValueError):
            self.misses += 1
            return
        rounds = total(samples, "pn2v_live_training_rounds_total", outcome="failed")
        backlog = total(samples, "pn2v_live_backlog_frames")
        self.samples.append((t_s, int(rounds or 0), int(backlog or 0)))

    def round_times(self) -> list[float]:
        """When each round completed (s; to the sampling period; rounds completing between two
        samples share the later one's time)."""
        times, previous = [], 0
        for t_s, rounds, _ in self.samples:
            times += [t_s] * (rounds - previous)
            previous = max(previous, rounds)
        return times

    def summary(self, stream_end_s: float | None, denoised_all_s: float | None) -> dict[str, Any]:
        """`stream_end_s`: when the last frame was sent; `denoised_all_s`: when every sent frame
        first had a twin (both s after the first frame, None if never). Result keys: rounds and
        their times, the longest wait for a round while inference was behind (from the first
        round until every frame had a twin, or the last sample), the backlog's peak, and when it
        was worked off."""
        rounds = self.round_times()
        last_sample = self.samples[-1][0] if self.samples else 0.0
        end = denoised_all_s if denoised_all_s is not None else last_sample
        during = [t for t in rounds if t <= end]
        gaps = [b - a for a, b in pairwise([*during, end])]
        return {
            "training_rounds": len(rounds),
            "round_times_s": [round(t, 1) for t in rounds],
            "longest_round_wait_s": round(max(gaps), 1) if during else None,
            "backlog_max_frames": max((b for _, _, b in self.samples), default=None),
            "stream_end_s": None if stream_end_s is None else round(stream_end_s, 2),
            "backlog_worked_off_s": denoised_all_s,
            "metrics_misses": self.misses,
        }
