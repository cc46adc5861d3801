"""A calibrated noise model extended above its calibrated range by a fit to the stream's own
(signal estimate, raw) pairs: the daemon's answer to samples brighter than the calibration.

    p(x | s) = (1 − w(s)) · p_calibrated(x | s) + w(s) · p_stream(x | s)

with w(s) rising linearly from 0 at `join[0]` to 1 at `join[1]` (the calibrated maximum). Below
the join the calibrated model is used unchanged, above it only the stream's fit, and in between a
mixture of the two, which is itself a normalised density in x, so the model joins smoothly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from pn2v_live.core.noise.base import NoiseModel, noise_model_from_state

# Smallest mixture weight that reaches a log, so log(w) and its gradient stay finite.
TINY_WEIGHT = 1e-12


class RefinedNoiseModel(NoiseModel):
    """`calibrated` below `join`, `stream` above it, a linear blend across it (module docstring).

    `calibrated` is the model from `pn2v-live calibrate`, never itself a refined one: each
    refinement refits the stream part from fresh pairs, so nesting never grows.
    """

    kind: ClassVar[str] = "refined"

    def __init__(
        self,
        calibrated: NoiseModel,
        stream: NoiseModel,
        join: tuple[float, float],
        signal_range: tuple[float, float],
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__(signal_range, metadata)
        self.calibrated, self.stream = calibrated, stream
        self.join = (float(join[0]), float(join[1]))

    def stream_weight(self, signal: torch.Tensor) -> torch.Tensor:
        """w(s): 0 below the join, 1 above it, linear in between."""
        low, high = self.join
        return ((signal - low) / max(high - low, 1e-6)).clamp(0, 1)

    def log_likelihood(self, observation: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        observation, signal = torch.broadcast_tensors(observation.float(), signal.float())
        weight = self.stream_weight(signal)
        if not torch.compiler.is_compiling():  # skip a part no pair needs (the usual case)
            if not bool((weight > 0).any()):
                return self.calibrated.log_likelihood(observation, signal)
            if not bool((weight < 1).any()):
                return self.stream.log_likelihood(observation, signal)
        below = self.calibrated.log_likelihood(observation, signal)
        above = self.stream.log_likelihood(observation, signal)
        blend = torch.logaddexp(
            below + (1 - weight).clamp(min=TINY_WEIGHT).log(),
            above + weight.clamp(min=TINY_WEIGHT).log(),
        )
        return torch.where(weight <= 0, below, torch.where(weight >= 1, above, blend))

    def state(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "calibrated": self.calibrated.state(),
            "stream": self.stream.state(),
            "join": list(self.join),
            "signal_range": list(self.signal_range),
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RefinedNoiseModel:
        return cls(
            noise_model_from_state(state["calibrated"]),
            noise_model_from_state(state["stream"]),
            tuple(state["join"]),
            tuple(state["signal_range"]),
            state["metadata"],
        )
