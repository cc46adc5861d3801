"""The daemon's camera maps (`pipeline.camera_frames`): which region of the maps an acquisition's
frames cover, refusal at ingest of frames beyond them, and the trainer's equalised frames with
their read-noise variance as the last channel of every patch, and the maps' id in the registry
entry of the model trained on them."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from pn2v_live.core.context import SPATIAL, Context, window
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import CameraNoiseModel
from pn2v_live.core.registration import Shifts, moved
from pn2v_live.core.synthetic import scene
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.pipeline.inference import InferenceScheduler, Job
from pn2v_live.pipeline.trainer import Trainer, TrainerSettings
from pn2v_live.pipeline.training_series import read_series
from pn2v_live.pipeline.training_series import usable_window as _usable_window
from pn2v_live.service.commands.camera_options import trained_maps_id
from pn2v_live.storage.checkpoints import load_denoiser
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.rejected import Rejected
from pn2v_live.storage.store import Store

SETTINGS = TrainerSettings(every_frames=8, every_seconds=3600, steps_per_round=2, patch_size=16,
                           batch_size=2, k=8, learning_rate=1e-3, context="0:0",
                           first_model_frames=8, first_model_steps=2,
                           min_gain_db=-float("inf"))  # fmt: skip


@pytest.fixture
def maps():
    return scmos_maps((40, 48), seed=2)


def test_frames_are_placed_at_their_source_s_origin_else_the_default(tmp_path, maps):
    camera = CameraFrames(CameraNoiseModel.from_maps(maps, (100.0, 900.0)), default_origin=(4, 8))
    store = Store(tmp_path / "store")
    try:
        given = store.acquisition_for("roi", (16, 16), np.uint16, sensor_origin=(24, 32),
                                      check=camera.admit)  # fmt: skip
        assert camera.origin(given) == (24, 32)
        # A later frame's other origin does not move the acquisition.
        store.acquisition_for("roi", (16, 16), np.uint16, sensor_origin=(0, 0),
                              check=camera.admit)  # fmt: skip
        assert store.acquisition("roi").sensor_origin == (24, 32)
        default = store.acquisition_for("whole", (36, 40), np.uint16, check=camera.admit)
        assert default.sensor_origin is None and camera.origin(default) == (4, 8)
        with pytest.raises(Rejected, match="outside the camera maps") as refused:
            store.acquisition_for("big", (40, 48), np.uint16, check=camera.admit)
        assert refused.value.reason == "camera_maps"
        assert "big" not in store.acquisitions()  # refused before anything was created
        raw = ScmosCamera(maps).acquisition(1, seed=3)[0][0, 24:40, 32:48]
        equalised, variance = camera.inputs(given, raw)
        region = maps.region((24, 32), (16, 16))
        np.testing.assert_array_equal(equalised, region.equalise(raw))
        np.testing.assert_array_equal(variance, region.pixel_variance())
        plain = CameraFrames(CameraNoiseModel.from_maps(maps, (100.0, 900.0)).base)
        assert plain.inputs(given, raw) == (raw, None)
        plain.admit((4000, 4000), None)  # without maps any size is taken
    finally:
        store.close()


def test_trainer_reads_equalised_frames_and_a_variance_channel(tmp_path, maps):
    model = CameraNoiseModel.from_maps(maps, (100.0, 900.0))
    store = Store(tmp_path / "store")
    raw = ScmosCamera(maps).acquisition(12, seed=4)[0][:, 8:32, 16:40]
    acquisition = store.acquisition_for("roi", (24, 24), np.uint16, sensor_origin=(8, 16))
    for t, frame in enumerate(raw):
        acquisition.write_raw(t, frame)
    idle = threading.Event()
    idle.set()
    trainer = Trainer(store, ModelRegistry(tmp_path / "models"), model, "nm", SETTINGS,
                      torch.device("cpu"), idle, camera=CameraFrames(model))  # fmt: skip
    try:
        window = _usable_window(acquisition)
        series, _ = read_series(acquisition, window, trainer.read_raw, trainer.camera, Shifts())
        region = maps.region((8, 16), (24, 24))
        for t in series.trained + series.held_back:
            np.testing.assert_array_equal(series.frames[t], region.equalise(raw[t]))
        np.testing.assert_array_equal(series.variance, region.pixel_variance())
        batch = series.training_windows(SPATIAL)[0]
        assert batch.shape == (2, 24, 24)
        np.testing.assert_array_equal(batch[1], region.pixel_variance())
        assert trainer.work()  # a whole round with the variance channel: a first model
        info = trainer.registry.current()  # it records the maps its frames were equalised with
        assert info.camera_maps_id == maps.content_id() == trainer.camera.maps_id
        on_disk = json.loads((tmp_path / "models" / "v0001.json").read_text())
        assert on_disk["camera_maps_id"] == maps.content_id()
        _, metadata = load_denoiser(tmp_path / "models" / "v0001.pt")
        assert trained_maps_id(metadata) == maps.content_id()  # what `denoise` checks
    finally:
        trainer.stop(timeout=60)
        store.close()


def test_inference_equalises_each_frame_where_it_was_on_the_sensor_before_registering(tmp_path):
    maps = scmos_maps((64, 96), seed=5, offset_spread=20.0)
    model = CameraNoiseModel.from_maps(maps, (100.0, 900.0))
    camera = ScmosCamera(maps)
    rng = np.random.default_rng(6)
    electrons = scene((64, 160), rng, 5.0, 300.0)  # a field sliding 3 px per frame
    raw = np.stack([camera.expose_electrons(electrons[:, 3 * t : 3 * t + 96], rng)
                    for t in range(5)])  # fmt: skip
    store = Store(tmp_path / "store")
    registry = ModelRegistry(tmp_path / "store" / "models")
    try:
        acquisition = store.create("drifting", (64, 96), "uint16")
        for t, frame in enumerate(raw):
            acquisition.write_raw(t, frame)
        torch.manual_seed(0)
        denoiser = new_denoiser("pn2v", 500.0, 100.0, k=4, depth=2, features=8,
                                context=Context(2, 0))  # fmt: skip
        registry.promote(denoiser, validation_loss=1.0, training_frames=1, training_steps=1,
                         noise_model_id=None)  # fmt: skip
        stage = InferenceScheduler(store, registry, model, torch.device("cpu"),
                                   camera=CameraFrames(model))  # fmt: skip
        stage.load_current_model()
        _, (stacked,), (variance,) = stage._read([Job(acquisition, 4, "new", Context(2, 0))])
        region = maps.region((0, 0), (64, 96))
        equalised = {t: region.equalise(frame) for t, frame in enumerate(raw)}
        np.testing.assert_array_equal(stacked, window(equalised, 4, Context(2, 0)))
        np.testing.assert_array_equal(variance, region.pixel_variance())
        assert [int(np.isnan(c).sum()) for c in stacked] == [6 * 64, 3 * 64, 0]  # moved 6, 3 px
        kept = stage.shifts.series(acquisition.identity)  # frame 4's next window measures none
        flat = np.ones((64, 96), np.float32)
        np.testing.assert_array_equal(kept.align(flat, 2, flat, 4), moved(flat, 0, -6))
    finally:
        store.close()
