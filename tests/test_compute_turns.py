"""Turns on the CPU: the trainer's and inference's torch work runs one call at a time, on one
thread, when the daemon has both on the CPU."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from pn2v_live.pipeline.compute_turns import THREAD_NAME, ComputeTurns


def test_shared_turns_run_every_call_alone_on_one_thread():
    turns = ComputeTurns(shared=True)
    calls: list[tuple[str, str, float, float]] = []  # (caller, thread, start, end)

    def work(caller: str, n: int) -> int:
        start = time.monotonic()
        time.sleep(0.002)
        calls.append((caller, threading.current_thread().name, start, time.monotonic()))
        return n * n

    results: dict[str, list[int]] = {}

    def caller(name: str) -> None:
        results[name] = [turns.run(work, name, n) for n in range(20)]

    callers = [threading.Thread(target=caller, args=(name,)) for name in ("trainer", "inference")]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(timeout=30)
    assert results == {name: [n * n for n in range(20)] for name in ("trainer", "inference")}
    assert {thread for _, thread, _, _ in calls} == {f"{THREAD_NAME}_0"}
    intervals = sorted((start, end) for _, _, start, end in calls)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(intervals))
    assert {caller for caller, *_ in calls} == {"trainer", "inference"}

    def fails() -> None:
        raise ValueError("bad frame")

    with pytest.raises(ValueError, match="bad frame"):
        turns.run(fails)
    assert turns.run(work, "after", 3) == 9  # a call that raised leaves the thread serving
    nested = turns.run(lambda: turns.run(lambda: threading.current_thread().name))
    assert nested == f"{THREAD_NAME}_0"  # a turn asking for a turn has it (no deadlock)
    turns.close()
    with pytest.raises(RuntimeError):
        turns.run(work, "closed", 1)


def test_unshared_turns_run_on_the_callers_thread():
    turns = ComputeTurns(shared=False)
    assert not turns.shared
    assert turns.run(lambda: threading.current_thread().name) == threading.current_thread().name
    turns.close()


@pytest.mark.parametrize(
    ("inference", "trainer", "scheduler", "shared"),
    [
        ("cpu", "cpu", "local", True),
        ("cuda", "cpu", "local", False),
        ("cpu", "cuda", "local", False),
        ("cuda", "cuda", "local", False),
        ("cpu", "cpu", "tcp://dask-box:8786", False),
    ],
)
def test_turns_are_shared_only_where_training_and_local_inference_are_both_on_the_cpu(
    inference, trainer, scheduler, shared
):
    turns = ComputeTurns.for_devices(torch.device(inference), torch.device(trainer), scheduler)
    assert turns.shared is shared
    turns.close()
