"""The trainer stage on a real store: bounded rounds, held-back validation, promotion, priority,
turns with inference on the CPU."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from torch import nn

from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.core.patches import sample_patches
from pn2v_live.core.training import Training
from pn2v_live.pipeline.busy_time import BusyTime
from pn2v_live.pipeline.compute_turns import THREAD_NAME, ComputeTurns
from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.pipeline.trainer import SHARED_SLOWDOWN, Trainer, TrainerSettings
from pn2v_live.pipeline.training_series import VALIDATION_PATCHES
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store

SETTINGS = TrainerSettings(
    every_frames=4,
    every_seconds=3600,
    steps_per_round=2,
    patch_size=16,
    batch_size=2,
    k=8,
    learning_rate=1e-3,
    context="0:0",
    first_model_frames=12,
    first_model_steps=2,
    min_gain_db=float("-inf"),  # tests of the round's logic: any model may be promoted
)


def trainer_state_metric() -> str:
    """The state the scraped Prometheus enum reports as 1."""
    samples = {
        state: REGISTRY.get_sample_value(
            "pn2v_live_trainer_state", {"pn2v_live_trainer_state": state}
        )
        for state in ("idle", "training", "waiting")
    }
    (state,) = [name for name, value in samples.items() if value == 1]
    return state


def stored_scene(tmp_path):
    """A store with an empty 24×24 uint8 acquisition "cells", its model registry, a noise model,
    and `add_frames(n)`, which stores n more Poisson frames of one scene."""
    store = Store(tmp_path / "store")
    registry = ModelRegistry(tmp_path / "store" / "models")
    noise = PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 100))
    acquisition = store.create("cells", (24, 24), "uint8")
    rng = np.random.default_rng(0)
    scene = rng.uniform(20, 80, size=(24, 24))

    def add_frames(n: int) -> None:
        start = len(acquisition.stored_frames())
        for t in range(start, start + n):
            acquisition.write_raw(t, rng.poisson(scene).astype(np.uint8))

    return store, registry, noise, acquisition, add_frames


@pytest.fixture
def setup(tmp_path):
    store, registry, noise, _, add_frames = stored_scene(tmp_path)
    idle = threading.Event()
    idle.set()
    trainer = Trainer(store, registry, noise, "nm-id", SETTINGS, torch.device("cpu"), idle)
    yield trainer, registry, add_frames, idle
    trainer.stop(timeout=60)
    store.close()


def test_round_promotes_first_model_with_metadata_and_holds_back_frames(setup):
    trainer, registry, add_frames, idle = setup
    add_frames(3)
    assert trainer.work() is False  # 3 frames: none held back yet (t % 8 == 3)
    add_frames(9)  # frames 0..11: 3 and 11 are held back
    assert trainer.work() is True
    info = registry.current()
    assert (info.version, info.parent, info.noise_model_id) == (1, None, "nm-id")
    assert info.camera_maps_id is None  # frames as they are, without sCMOS maps
    assert info.training_frames == 10 and info.training_steps == SETTINGS.steps_per_round
    assert np.isfinite(info.validation_loss)
    record = trainer.history[-1]
    assert record["promoted_version"] == 1 and record["promoted_loss"] is None
    assert registry.load()[0].k == SETTINGS.k
    assert trainer.work() is False  # no new frames and not overdue: no round


def test_later_rounds_promote_only_improvements(setup):
    trainer, registry, add_frames, idle = setup
    add_frames(12)
    trainer.work()
    for _ in range(3):
        add_frames(SETTINGS.every_frames)
        assert trainer.work() is True
        record = trainer.history[-1]
        if record["promoted_version"] is not None:
            assert record["validation_loss"] < record["promoted_loss"]
            assert registry.current().version == record["promoted_version"]
            assert registry.current().parent == record["promoted_version"] - 1
        else:
            assert record["validation_loss"] >= record["promoted_loss"]
    assert trainer.rounds == 4
    versions = registry.versions()
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))


def test_training_waits_while_inference_has_fresh_frames(setup):
    trainer, registry, add_frames, idle = setup
    trainer.settings = replace(trainer.settings, training_share=0.0)  # inference takes all
    idle.clear()  # inference busy with new frames
    add_frames(12)
    trainer.start()
    time.sleep(3)
    assert trainer.rounds == 0 and registry.current() is None
    assert trainer.alive(max_silence=2)  # waiting is progress for the watchdog
    assert trainer.state == "waiting" and trainer_state_metric() == "waiting"
    idle.set()
    deadline = time.monotonic() + 120
    while trainer.rounds == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert registry.current().version == 1
    deadline = time.monotonic() + 10
    while trainer.state != "idle":  # the round's bookkeeping ends just after `rounds` counts it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert trainer_state_metric() == "idle"


def test_busy_time_share_of_a_sliding_window():
    busy = BusyTime(window=10.0)
    busy.add(0.0, 2.0)
    busy.add(5.0, 6.0)
    assert busy.share(10.0) == pytest.approx(0.3)
    assert busy.share(11.0) == pytest.approx(0.2)  # the first interval half out of the window
    assert busy.share(17.0) == pytest.approx(0.0)


def test_training_takes_its_share_while_inference_is_behind(setup):
    """A stream faster than inference: training still runs, for about its share of the time."""
    trainer, registry, add_frames, idle = setup
    add_frames(12)
    assert trainer.work() is True and registry.current() is not None  # a model to run
    trainer.settings = replace(trainer.settings, training_share=0.25, steps_per_round=10**6)
    trainer._busy = BusyTime(window=2.0)
    idle.clear()  # inference never catches up
    add_frames(4)
    trainer.start()
    started = time.monotonic()
    time.sleep(8)
    elapsed = time.monotonic() - started
    # Training ran about its share (a step may overrun it by one step; waits are 0.1 s ticks).
    assert 0.12 < trainer._busy.total / elapsed < 0.45
    assert trainer.alive(max_silence=2)


def test_the_first_models_steps_are_not_taken_from_inference(setup):
    """Before a model is served inference has nothing it can run: the first model's steps do not
    count toward training's share (so it does not pause for inference once that model is
    served); a later round's steps do."""
    trainer, registry, add_frames, _ = setup
    add_frames(12)
    assert trainer.work() is True and registry.current().version == 1
    assert trainer.history[-1]["steps"] == 2 and trainer._busy.total == 0
    add_frames(4)
    assert trainer.work() is True and len(trainer.history) == 2
    assert trainer._busy.total > 0
    assert trainer._busy.share(time.monotonic()) > 0


def test_rounds_keep_to_every_seconds_however_slow_their_steps(setup):
    """Inference always behind, a round of a million steps: rounds after the first model still
    end, settled and validated, within `every_seconds`, with the steps that fitted; the first
    model's after-steps time, measured with the machine to itself, is budgeted as if inference
    had shared it."""
    trainer, registry, add_frames, idle = setup
    trainer.settings = replace(
        trainer.settings, training_share=0.5, steps_per_round=10**6, every_seconds=10.0,
        every_frames=10**6,
    )  # fmt: skip
    add_frames(12)
    assert trainer.work() is True  # the first model: its own two steps, no time limit
    assert trainer.history[-1]["steps"] == 2
    first_after_steps = trainer.history[-1]["after_steps_seconds"]
    assert max(trainer._after_steps_s) == pytest.approx(SHARED_SLOWDOWN * first_after_steps)
    idle.clear()  # inference never catches up
    trainer.start()
    deadline = time.monotonic() + 120
    while len(trainer.history) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    later = list(trainer.history)[1:]
    assert len(later) >= 2
    for record in later:
        assert 0 < record["steps"] < 10**6
        assert record["seconds"] < 10.0  # ROUND_SHARE of it for steps, the rest to validate
    assert registry.current() is not None


def test_precision_setting_decides_the_body_dtype_of_training(setup, tmp_path):
    trainer, _, add_frames, idle = setup
    add_frames(12)
    store = trainer.store
    held_back = [store.acquisition("cells").read_raw(t) for t in (3, 11)]
    val_batch = sample_patches(held_back, VALIDATION_PATCHES, 16, np.random.default_rng(0))
    recorded = {}
    for precision, bf16 in (("float32", False), ("bfloat16", True)):
        registry = ModelRegistry(tmp_path / f"models-{precision}")
        settings = replace(SETTINGS, precision=precision)
        torch.manual_seed(0)  # the same initial weights for both
        Trainer(
            store, registry, trainer.noise_model, "nm-id", settings, torch.device("cpu"), idle
        ).work()
        recorded[precision] = registry.current().validation_loss
        # the loss the round recorded is the one computed in the configured precision
        again = Training(registry.load()[0], trainer.noise_model, bf16=bf16).validation_loss(
            val_batch
        )
        assert recorded[precision] == pytest.approx(again, rel=1e-6)
    assert recorded["float32"] != pytest.approx(recorded["bfloat16"], rel=1e-6)


def test_auto_context_tries_every_candidate_and_keeps_the_lowest_validation_loss(
    setup, tmp_path, caplog
):
    trainer, _, add_frames, idle = setup
    add_frames(12)
    registry = ModelRegistry(tmp_path / "models-auto")
    settings = replace(SETTINGS, context="auto", first_model_steps=32)
    auto = Trainer(
        trainer.store, registry, trainer.noise_model, "nm-id", settings, torch.device("cpu"), idle
    )
    with caplog.at_level("INFO", logger="pn2v_live"):
        assert auto.work() is True
    losses = {
        line.split()[1].rstrip(":"): float(line.split()[-1])
        for line in caplog.messages
        if line.startswith("context ") and line.split()[2:4] == ["validation", "loss"]
    }
    assert set(losses) == {"0:0", "1:1", "3:3", "8:2"}  # 12 frames allow every candidate
    chosen = registry.load()[0].context
    assert str(chosen) == min(losses, key=losses.get)
    assert auto.history[-1]["context"] == str(chosen)
    # the promoted model's steps: its own pilot (a quarter shared by the four candidates, 2
    # each) and the rest of the round (32 - 8 - 4 · 2), after the single-frame start (a quarter
    # of the round, 8) if it is the single frame; temporal windows start fresh
    head_start = 8 if str(chosen) == "0:0" else 0
    assert registry.current().training_steps == head_start + 2 + 16
    # a pinned context is used as it is, without trying the others
    pinned = Trainer(
        trainer.store, ModelRegistry(tmp_path / "models-pinned"), trainer.noise_model, "nm-id",
        replace(settings, context="2:1"), torch.device("cpu"), idle,
    )  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO", logger="pn2v_live"):
        assert pinned.work() is True
    assert str(pinned.registry.load()[0].context) == "2:1"
    assert not [line for line in caplog.messages if "chosen by validation loss" in line]


def unreadable_count() -> float:
    """pn2v_live_frames_unreadable_total of the trainer, as scraped."""
    sample = REGISTRY.get_sample_value("pn2v_live_frames_unreadable_total", {"stage": "trainer"})
    return sample or 0.0


def chunk(store: Store, name: str, t: int):
    """The raw chunk file of frame `t` (zarr format 2, '/' separated keys)."""
    return store.root / f"{name}.ome.zarr" / "raw" / "0" / str(t) / "0" / "0" / "0" / "0"


def test_rounds_choose_the_newest_trainable_acquisition_and_skip_damaged_frames(setup):
    """Idle and post-restart rounds train on today's sample, not the biggest old acquisition;
    a too-short acquisition and a damaged frame do not stop rounds."""
    trainer, registry, add_frames, idle = setup
    store = trainer.store
    rng = np.random.default_rng(1)
    old = store.create("last_week", (24, 24), "uint8")
    for t in range(40):  # bigger than "cells", but older
        old.write_raw(t, rng.poisson(30, (24, 24)).astype(np.uint8))
    add_frames(12)
    short = store.create("snapshot", (24, 24), "uint8")  # newest, but no held-back frame yet
    short.write_raw(0, rng.poisson(30, (24, 24)).astype(np.uint8))
    chunk(store, "cells", 5).write_bytes(b"not a blosc chunk")
    unreadable = unreadable_count()
    assert trainer.work() is True  # no model yet: the first round starts at once
    record = trainer.history[-1]
    assert record["acquisition"] == "cells"  # newest trainable; nothing counts as new yet
    assert registry.current().training_frames == 9  # 10 training frames, one damaged
    assert unreadable_count() == unreadable + 1
    due = time.monotonic() - 0.5  # overdue by half a second (a late poll): an idle round
    trainer._last_round = due - SETTINGS.every_seconds
    assert trainer.work() is True
    assert trainer._last_round == due  # a late poll keeps the round's place in the schedule
    assert trainer.history[-1]["acquisition"] == "cells"


def test_a_window_that_does_not_read_back_is_tried_again_only_on_new_frames(setup):
    """Every held-back frame damaged: the trainer does not re-read (and re-log) the same window
    every half second; new frames bring a new try, and a readable held-back frame a round."""
    trainer, registry, add_frames, idle = setup
    add_frames(12)  # held back: frames 3 and 11
    for t in (3, 11):
        chunk(trainer.store, "cells", t).write_bytes(b"not a blosc chunk")
    unreadable = unreadable_count()
    assert trainer.work() is False
    assert unreadable_count() == unreadable + 2
    assert trainer.work() is False  # nothing new: the damaged window is not read again
    assert unreadable_count() == unreadable + 2
    add_frames(1)  # frame 12: a new try, still no readable held-back frame
    assert trainer.work() is False
    assert unreadable_count() == unreadable + 4
    add_frames(7)  # frames 13..19; 19 is held back and reads
    assert trainer.work() is True
    assert registry.current().version == 1 and unreadable_count() == unreadable + 6


def test_first_model_waits_for_enough_frames_or_the_end_of_the_acquisition(setup):
    trainer, registry, add_frames, idle = setup
    trainer.settings = replace(trainer.settings, first_model_frames=20)
    add_frames(12)
    assert trainer.work() is False  # 12 of 20 frames: too few to learn from yet
    trainer.store.acquisition("cells").close()
    trainer.store.open_acquisitions()  # the closed flag is read back from the store
    closed = trainer.store.acquisition("cells")
    assert closed.closed
    assert trainer.work() is True  # all the frames there will be
    assert registry.current() is not None


def test_a_model_not_measurably_better_than_raw_is_never_promoted(setup):
    trainer, registry, add_frames, idle = setup
    trainer.settings = replace(trainer.settings, min_gain_db=20.0)
    add_frames(13)  # held-back frame 3 and 11, with the frames after them: frame pairs
    assert trainer.work() is True
    record = trainer.history[-1]
    assert record["promoted_version"] is None and registry.current() is None
    assert record["estimated_gain_db"] - 2 * record["estimated_gain_uncertainty_db"] < 20.0
    trainer.settings = replace(trainer.settings, min_gain_db=-100.0)
    add_frames(SETTINGS.every_frames)
    assert trainer.work() is True
    info = registry.current()
    assert info.estimated_gain_db == trainer.history[-1]["estimated_gain_db"]
    assert info.estimated_gain_uncertainty_db > 0


def test_a_refined_noise_model_starts_a_round_at_once(setup):
    trainer, registry, add_frames, idle = setup
    add_frames(12)
    assert trainer.work() is True
    assert trainer.work() is False  # no new frames, not overdue
    refined = PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.5, signal_range=(0, 300))
    trainer.use_noise_model(refined, "refined-id")
    assert trainer.work() is True  # the refined model gets its round without waiting
    assert trainer.noise_model_id == "refined-id"
    assert trainer.work() is False


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
    store, registry, noise, acquisition, add_frames = stored_scene(tmp_path)
    add_frames(12)
    turns = ComputeTurns(shared=shared)
    cpu = torch.device("cpu")
    inference = InferenceScheduler(store, registry, noise, cpu, turns=turns, warm_up_k=SETTINGS.k)
    trainer = Trainer(store, registry, noise, "nm-id", SETTINGS, cpu, inference.idle, turns=turns)

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
