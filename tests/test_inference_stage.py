"""The inference stage on a real store: order of work, back-fill, hot swap, exact MMSE output."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch
import zarr
from prometheus_client import REGISTRY

from pn2v_live.core.context import Context
from pn2v_live.core.inference import denoise
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.pipeline.inference import InferenceScheduler, default_in_flight, denoise_frame
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


def test_waiting_for_the_first_model_it_warms_up_once_and_the_model_finds_its_kernel(setup, caplog):
    """Before the first model, one stored frame is denoised with an untrained stand-in of the
    trainer's architecture (nothing written), compiling the MMSE kernel; the first model, here
    a residual temporal one, denoises with that kernel, without compiling again."""
    from torch._dynamo.utils import counters

    store, registry, noise, acquisition, frames, _, _ = setup
    stage = InferenceScheduler(
        store, registry, noise, torch.device("cpu"), compiled=True, warm_up_k=16
    )
    graphs = counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO, logger="pn2v_live"):
        assert stage.work() is False
        assert stage.work() is False
    assert caplog.text.count("warmed up for the first model") == 1
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert stage.waiting_for_model and stage.backlog == 10
    assert all(acquisition.denoised_version(t) is None for t in range(10))

    torch.manual_seed(0)
    trained = new_denoiser("pn2v", mean=100.0, std=50.0, k=16, context=Context(1, 1))
    promote(registry, trained, 1.0)
    assert stage.work() is True
    assert acquisition.denoised_version(9) == 1
    assert counters["stats"]["unique_graphs"] == graphs + 1


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


def chunk(store: Store, t: int):
    return store.root / "cells.ome.zarr" / "raw" / "0" / str(t) / "0" / "0" / "0" / "0"


def test_a_damaged_frame_or_acquisition_holds_up_nothing_else(setup):
    store, registry, noise, acquisition, frames, stage, published = setup
    chunk(store, 5).write_bytes(b"not a blosc chunk")
    (store.root / "foreign.ome.zarr" / "raw").mkdir(parents=True)  # no zarr metadata at all
    labels = {"stage": "inference"}
    unreadable = REGISTRY.get_sample_value("pn2v_live_frames_unreadable_total", labels) or 0.0
    promote(registry, tiny_model(0), 2.0)
    while stage.work():
        pass
    assert [acquisition.denoised_version(t) for t in range(10)] == [1] * 5 + [None] + [1] * 4
    assert stage.backlog == 0 and stage.idle.is_set()  # the trainer is not kept waiting
    (failed,) = stage.frame_failures.report()["frames"]  # tried again after 1 s, 2 s, ...
    assert REGISTRY.get_sample_value("pn2v_live_frames_unreadable_total", labels) == (
        unreadable + failed["attempts"]
    )
    acquisition.write_raw(5, frames[5])  # the frame arrives again
    while not stage.frame_failures.due("cells", 5):  # its back-off
        time.sleep(0.05)
    assert stage.work() is True
    np.testing.assert_array_equal(
        acquisition.read_denoised(5), denoise(registry.load()[0], frames[5], noise)["denoised"]
    )


def test_a_frame_that_never_reads_back_fails_alone_on_its_own_back_off(setup, caplog):
    """The newest frame's chunk is corrupt on disk: the running stage denoises every other frame,
    retries that one on a doubling back-off with one log line per 1st, 2nd, 4th, ... failure,
    counts it by reason, lists it as failed with its reason, and stays healthy."""
    store, registry, noise, acquisition, frames, stage, published = setup
    chunk(store, 9).write_bytes(b"\x00" * 64)  # newest: first in line
    labels = {"stage": "inference", "reason": "error"}
    failures = REGISTRY.get_sample_value("pn2v_live_stage_failures_total", labels) or 0.0
    promote(registry, tiny_model(0), 2.0)
    stage.start()
    try:
        deadline = time.monotonic() + 60

        def attempts() -> int:
            return sum(frame["attempts"] for frame in stage.frame_failures.report()["frames"])

        # the others all denoised, and frame 9 tried 3 times (at about 0, 1 and 3 s)
        while any(acquisition.denoised_version(t) is None for t in range(9)) or attempts() < 3:
            assert time.monotonic() < deadline, stage.frame_failures.report()
            time.sleep(0.05)
        assert stage.liveness(max_silence=30).state == "ok"
    finally:
        assert stage.stop(timeout=30)
    assert [acquisition.denoised_version(t) for t in range(10)] == [1] * 9 + [None]
    (failed,) = stage.frame_failures.report()["frames"]
    assert failed["acquisition"] == "cells" and failed["t"] == 9 and failed["what"] == "reading"
    assert failed["reason"] == "error" and "blosc" in failed["error"]
    attempts = failed["attempts"]
    assert REGISTRY.get_sample_value("pn2v_live_stage_failures_total", labels) == (
        failures + attempts
    )
    lines = [r for r in caplog.records if "reading frame 9 failed" in r.getMessage()]
    assert len(lines) == len([n for n in range(1, attempts + 1) if n & (n - 1) == 0]), lines
    assert sum(r.exc_info is not None for r in lines) == 1  # a traceback the first time only


def test_a_frame_that_does_not_denoise_fails_alone(setup, monkeypatch):
    store, registry, noise, acquisition, frames, stage, published = setup
    poisoned = frames[7].copy()

    def denoise_or_fail(denoiser, noise_model, raw, *args):
        if np.array_equal(raw.reshape(poisoned.shape), poisoned):  # a (1, Y, X) window
            raise ValueError("injected: this frame does not denoise")
        return denoise_frame(denoiser, noise_model, raw, *args)

    monkeypatch.setattr("pn2v_live.pipeline.inference.denoise_frame", denoise_or_fail)
    promote(registry, tiny_model(0), 2.0)
    while stage.work():
        pass
    assert [acquisition.denoised_version(t) for t in range(10)] == [1] * 7 + [None] + [1] * 2
    report = stage.frame_failures.report()
    assert report["count"] == 1
    (failed,) = report["frames"]
    assert failed | {"attempts": 1} == {
        "acquisition": "cells", "t": 7, "what": "denoising", "reason": "error",
        "error": "ValueError: injected: this frame does not denoise", "attempts": 1,
    }  # fmt: skip
    monkeypatch.undo()
    while not stage.frame_failures.due("cells", 7):  # its back-off
        time.sleep(0.05)
    assert stage.work() is True
    assert acquisition.denoised_version(7) == 1 and stage.frame_failures.report()["count"] == 0
