"""Turns on the CPU: the trainer's steps and inference's frames run one at a time, on one thread.

On a CPU, torch spreads one training step, or one frame's denoising, over every core. Called
from the trainer's and inference's own threads at once, the two would each start a team of
threads on the same cores and contend for them, and both working sets would be live at once.
Run on one thread in turn, they use the cores without contending and one working set at a time
is live: in a trial beside a stream, training made more steps, and memory held the larger
working set rather than the sum (docs/soak.md). Who goes when stays the stages' decision (the
trainer's `training_share`); turns come first in, first out.

Where either runs on a GPU, or inference on a dask cluster, each stage keeps its own thread
(`ComputeTurns(shared=False)` runs every call on the caller's thread).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

THREAD_NAME = "compute"


class ComputeTurns:
    """Runs calls one at a time on one thread of its own (`shared`), else on the caller's."""

    def __init__(self, shared: bool = False):
        self._thread_id: int | None = None  # the turns' thread, once started
        self.executor: Executor | None = (
            ThreadPoolExecutor(1, THREAD_NAME, initializer=self._note_thread) if shared else None
        )

    def _note_thread(self) -> None:
        self._thread_id = threading.get_ident()

    @classmethod
    def for_devices(
        cls, inference: torch.device, trainer: torch.device, scheduler: str
    ) -> ComputeTurns:
        """Shared turns where the daemon's inference (local) and training both run on the CPU."""
        return cls(inference.type == trainer.type == "cpu" and scheduler == "local")

    @property
    def shared(self) -> bool:
        return self.executor is not None

    def run(self, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`function(*args, **kwargs)` in its turn; its result, or the exception it raised. A
        call from within a turn runs at once (it has the turn already)."""
        if self.executor is None or threading.get_ident() == self._thread_id:
            return function(*args, **kwargs)
        return self.executor.submit(function, *args, **kwargs).result()

    def close(self) -> None:
        """Finish the calls queued, then end the thread; calls after this raise RuntimeError."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
