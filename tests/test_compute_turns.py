"""Turns on the CPU: the trainer's and inference's torch work runs one call at a time, on one
thread, when the daemon has both on the CPU."""

from __future__ import annotations

import itertools
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.pipeline.compute_turns import THREAD_NAME, ComputeTurns
from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.pipeline.trainer import Trainer, TrainerSettings
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store


def test_shared_turns_run_every_call_alone_on_one_thread_first_come_first_served():
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


def convolution_threads(run) -> set[str]:
    """The names of the threads that ran a convolution of any network while `run()` ran."""
    names: set[str] = set()

    def record(module, inputs):
        if isinstance(module, nn.Conv2d):
            names.add(threading.current_thread().name)

    hook = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run()
    finally:
        hook.remove()
    return names


@pytest.mark.parametrize("shared", [True, False])
def test_trainer_and_inference_stages_compute_in_turns_on_one_thread(tmp_path, shared):
    store = Store(tmp_path / "store")
    registry = ModelRegistry(tmp_path / "store" / "models")
    noise = PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 100))
    acquisition = store.create("cells", (24, 24), "uint8")
    rng = np.random.default_rng(0)
    scene = rng.uniform(20, 80, size=(24, 24))
    for t in range(12):
        acquisition.write_raw(t, rng.poisson(scene).astype(np.uint8))
    turns = ComputeTurns(shared=shared)
    settings = TrainerSettings(
        every_frames=4, every_seconds=3600, steps_per_round=2, patch_size=16, batch_size=2, k=8,
        learning_rate=1e-3, context="0:0", first_model_frames=12, first_model_steps=2,
        min_gain_db=float("-inf"),
    )  # fmt: skip
    inference = InferenceScheduler(
        store, registry, noise, torch.device("cpu"), turns=turns, warm_up_k=settings.k
    )
    trainer = Trainer(
        store, registry, noise, "nm-id", settings, torch.device("cpu"), inference.idle, turns=turns
    )

    def serve() -> None:
        inference.start()
        trainer.start()
        started = time.monotonic()
        while not all(acquisition.denoised_version(t) for t in range(12)):
            assert time.monotonic() - started < 120, "no model or twins within 2 minutes"
            time.sleep(0.05)
        assert trainer.stop(timeout=60) and inference.stop(timeout=60)

    try:
        threads = convolution_threads(serve)
    finally:
        turns.close()
        store.close()
    assert all(acquisition.denoised_version(t) == 1 for t in range(12))
    # warm-up, training steps, validation, the gain estimate and every frame: one thread, in
    # turns; without shared turns the trainer computes on its own thread, inference on others
    if shared:
        assert threads == {f"{THREAD_NAME}_0"}
    else:
        assert "trainer" in threads and len(threads) >= 2 and f"{THREAD_NAME}_0" not in threads
