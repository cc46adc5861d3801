"""The inference stage on a real store: order of work, back-fill, hot swap, exact MMSE output."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import zarr
from prometheus_client import REGISTRY

from pn2v_live.core.inference import denoise
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.pipeline.inference import InferenceScheduler, default_in_flight
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store

SHAPE = (32, 40)


@pytest.fixture
def setup(tmp_path):
    store = Store(tmp_path / "store")
    registry = ModelRegistry(tmp_path / "store" / "models")
    noise = PoissonGaussianNoiseModel(gain=2.0, offset=10.0, read_noise=3.0, signal_range=(0, 200))
    acquisition = store.create("cells", SHAPE, "uint16")
    rng = np.random.default_rng(0)
    frames = rng.integers(10, 200, size=(10, *SHAPE)).astype(np.uint16)
    for t, frame in enumerate(frames):
        acquisition.write_raw(t, frame)
    published = []
    stage = InferenceScheduler(
        store,
        registry,
        noise,
        torch.device("cpu"),
        max_in_flight=3,
        on_frame=lambda acq, t, frame, version: published.append((acq.name, t, version)),
    )
    yield store, registry, noise, acquisition, frames, stage, published
    store.close()


def tiny_model(seed: int):
    torch.manual_seed(seed)
    return new_denoiser("pn2v", mean=100.0, std=50.0, k=4, depth=2, features=8)


def promote(registry, denoiser, loss):
    return registry.promote(
        denoiser, validation_loss=loss, training_frames=1, training_steps=1, noise_model_id=None
    )


def test_frames_wait_for_the_first_model_without_blocking_training(setup):
    store, registry, noise, acquisition, frames, stage, published = setup
    assert stage.work() is False
    assert stage.waiting_for_model and stage.backlog == 10
    assert stage.idle.is_set()  # nothing inference can do: the trainer may use the device
    assert all(acquisition.denoised_version(t) is None for t in range(10))


def test_newest_first_exact_mmse_then_backfill_after_promotion(setup):
    store, registry, noise, acquisition, frames, stage, published = setup
    first = tiny_model(0)
    promote(registry, first, 2.0)
    assert stage.work() is True
    assert not stage.idle.is_set()  # fresh frames were waiting: training must yield
    assert [t for _, t, _ in published] == [9, 8, 7]
    expected = denoise(first, frames[9], noise)["denoised"]
    np.testing.assert_array_equal(acquisition.read_denoised(9), expected)
    while stage.work():
        pass
    assert stage.backlog == 0 and stage.idle.is_set()
    assert sorted(t for _, t, _ in published) == list(range(10))
    assert {acquisition.denoised_version(t) for t in range(10)} == {1}

    # A better model arrives and, meanwhile, a new frame: the new frame comes first, then the
    # older frames are re-denoised newest first with the new version.
    second = tiny_model(1)
    promote(registry, second, 1.0)
    acquisition.write_raw(10, frames[0])
    published.clear()
    stage.work()
    assert published == [("cells", 10, 2)]
    stage.work()
    assert [t for _, t, _ in published[1:]] == [9, 8, 7]
    while stage.work():
        pass
    assert {acquisition.denoised_version(t) for t in range(11)} == {2}
    np.testing.assert_array_equal(
        acquisition.read_denoised(0), denoise(second, frames[0], noise)["denoised"]
    )


def test_stage_thread_denoises_and_stops_cleanly(setup):
    store, registry, noise, acquisition, frames, stage, published = setup
    promote(registry, tiny_model(0), 2.0)
    stage.start()
    try:
        start = time.monotonic()
        while stage.backlog or acquisition.denoised_version(0) is None:
            assert time.monotonic() - start < 60
            time.sleep(0.05)
        assert stage.alive(max_silence=30)
    finally:
        assert stage.stop(timeout=30)
    assert not stage.alive(max_silence=30)
    assert len(published) == 10


def test_local_cpu_default_denoises_one_frame_at_a_time(setup):
    store, registry, noise, acquisition, frames, _, _ = setup
    published = []
    stage = InferenceScheduler(
        store, registry, noise, torch.device("cpu"),
        on_frame=lambda acq, t, frame, version: published.append(t),
    )  # fmt: skip
    promote(registry, tiny_model(0), 2.0)
    assert stage.work() is True
    assert published == [9]  # torch already spreads one frame over every core
    assert default_in_flight("local", torch.device("cuda")) == 4
    assert default_in_flight("tcp://gpu-box:8786", torch.device("cpu")) == 4


def test_precision_setting_decides_the_body_dtype_of_every_frame(setup):
    store, registry, noise, acquisition, frames, _, _ = setup
    models = [tiny_model(0), tiny_model(1)]
    for version, (precision, bf16) in enumerate((("float32", False), ("bfloat16", True)), 1):
        promote(registry, models[version - 1], 3.0 - version)  # each one an improvement
        stage = InferenceScheduler(
            store, registry, noise, torch.device("cpu"), max_in_flight=10, precision=precision
        )
        while stage.work():
            pass
        assert {acquisition.denoised_version(t) for t in range(10)} == {version}
        model = models[version - 1]
        np.testing.assert_array_equal(
            acquisition.read_denoised(4), denoise(model, frames[4], noise, bf16=bf16)["denoised"]
        )
        other = denoise(model, frames[4], noise, bf16=not bf16)["denoised"]
        assert not np.array_equal(acquisition.read_denoised(4), other)


@pytest.mark.parametrize(("backfill_hours", "today_versions"), [(12, [2, 2, 2]), (0, [1, 1, 1])])
def test_backfill_only_touches_acquisitions_with_recent_frames(
    tmp_path, backfill_hours, today_versions
):
    store = Store(tmp_path / "store")
    registry = ModelRegistry(tmp_path / "store" / "models")
    noise = PoissonGaussianNoiseModel(gain=2.0, offset=10.0, read_noise=3.0, signal_range=(0, 200))
    frames = np.random.default_rng(0).integers(10, 200, size=(3, *SHAPE)).astype(np.uint16)
    for name in ("last_week", "today"):
        acquisition = store.create(name, SHAPE, "uint16")
        for t, frame in enumerate(frames):
            acquisition.write_raw(t, frame)
    store.close()
    # as if "last_week" had been acquired a week ago: move its newest-frame time back
    group = zarr.open_group(tmp_path / "store" / "last_week.ome.zarr", mode="r+")
    group.attrs["pn2v_live"] = group.attrs["pn2v_live"] | {"last_frame_at": time.time() - 7 * 86400}
    store = Store(tmp_path / "store")  # reopened: the times come from the store
    stage = InferenceScheduler(
        store, registry, noise, torch.device("cpu"), max_in_flight=10,
        backfill_hours=backfill_hours,
    )  # fmt: skip
    promote(registry, tiny_model(0), 2.0)
    while stage.work():
        pass
    promote(registry, tiny_model(1), 1.0)
    while stage.work():
        pass
    last_week, today = store.acquisition("last_week"), store.acquisition("today")
    assert [today.denoised_version(t) for t in range(3)] == today_versions
    # frames people may already have analysed keep the model that denoised them
    assert [last_week.denoised_version(t) for t in range(3)] == [1, 1, 1]
    assert stage.backlog == 0 and stage.idle.is_set()
    store.close()


def test_a_damaged_frame_or_acquisition_holds_up_nothing_else(setup, monkeypatch):
    store, registry, noise, acquisition, frames, stage, published = setup
    monkeypatch.setattr("pn2v_live.pipeline.inference.RETRY_SECONDS", 1.0)
    chunk = store.root / "cells.ome.zarr" / "raw" / "0" / "5" / "0" / "0" / "0" / "0"
    chunk.write_bytes(b"not a blosc chunk")
    (store.root / "foreign.ome.zarr" / "raw").mkdir(parents=True)  # no zarr metadata at all
    labels = {"stage": "inference"}
    unreadable = REGISTRY.get_sample_value("pn2v_live_frames_unreadable_total", labels) or 0.0
    promote(registry, tiny_model(0), 2.0)
    while stage.work():
        pass
    assert [acquisition.denoised_version(t) for t in range(10)] == [1] * 5 + [None] + [1] * 4
    assert stage.backlog == 0 and stage.idle.is_set()  # the trainer is not kept waiting
    assert REGISTRY.get_sample_value("pn2v_live_frames_unreadable_total", labels) == unreadable + 1
    acquisition.write_raw(5, frames[5])  # the frame arrives again
    time.sleep(1.0)
    assert stage.work() is True
    np.testing.assert_array_equal(
        acquisition.read_denoised(5), denoise(registry.load()[0], frames[5], noise)["denoised"]
    )
