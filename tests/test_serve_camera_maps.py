"""`pn2v-live serve` with sCMOS camera maps: a real daemon process fed over a real ZeroMQ socket
by a synthetic sCMOS camera. Checked against the library: every denoised frame equals the MMSE
of its equalised frame with its sensor region's read-noise variance (the whole sensor at the
configured origin, and a crop at the origin its header gives); a training round with the maps
promotes a model; a frame beyond the maps is refused with its reason while the daemon goes on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from serve_files import listeners

from pn2v_live.core.inference import denoise
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import CameraNoiseModel, PoissonGaussianNoiseModel
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.storage.camera_maps_file import save_camera_maps
from pn2v_live.storage.checkpoints import save_denoiser
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store
from pn2v_live.wire.sender import FrameSender

CLI = Path(sys.executable).with_name("pn2v-live")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
SENSOR = (48, 64)  # the maps: the whole (small) sensor
CROP_ORIGIN, CROP = (16, 24), (24, 32)  # a region of interest: where on the sensor, its shape

pytestmark = pytest.mark.timeout(300)


def metrics(port: int) -> dict[str, float]:
    """Scraped samples as {"name{label=value}": value}; {} while not listening."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {
        f"{s.name}{{{','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))}}}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: serve {process.poll()}\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_serve_denoises_with_the_maps_region_of_each_acquisition_and_refuses_beyond(tmp_path):
    maps = scmos_maps(SENSOR, seed=5)
    camera = ScmosCamera(maps)
    full, _ = camera.acquisition(16, seed=1)
    roi = full[:12, CROP_ORIGIN[0] : CROP_ORIGIN[0] + CROP[0], CROP_ORIGIN[1] :][:, :, : CROP[1]]
    save_camera_maps(maps, tmp_path / "maps.tif")
    offset, gain = maps.reference
    base = PoissonGaussianNoiseModel(gain, offset, float(np.sqrt(np.median(maps.variance))),
                                     (offset, offset + 500.0))  # fmt: skip
    save_noise_model(base, tmp_path / "noise.pt")
    torch.manual_seed(0)
    save_denoiser(new_denoiser("pn2v", 300.0, 100.0, k=16, depth=2, features=8),
                  tmp_path / "start.pt")  # fmt: skip
    zmq, metrics_port = f"tcp://127.0.0.1:{free_port(pairs=True)}", free_port()
    (tmp_path / "serve.toml").write_text(f"""
[store]
root = "store"
[noise_model]
path = "noise.pt"
[camera]
maps = "maps.tif"
sensor_origin = [0, 0]
[model]
initial = "start.pt"
[ingest.zmq]
bind = "{zmq}"
[trainer]
device = "cpu"
every_frames = 16
every_seconds = 3600
steps_per_round = 3
min_gain_db = -inf
patch_size = 16
batch_size = 2
[inference]
device = "cpu"
compile = false
precision = "float32"
{listeners(metrics=f"127.0.0.1:{metrics_port}")}
""")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([CLI, "serve", "--config", tmp_path / "serve.toml"],
                                   stdout=out, stderr=out, env=ENV)  # fmt: skip
    try:
        wait_for(lambda: metrics(metrics_port), 90, "metrics endpoint", process, log)
        sender = FrameSender(zmq)
        sender.send_frame("big", 0, np.zeros((SENSOR[0], SENSOR[1] + 8), np.uint16))
        for t, frame in enumerate(roi):
            sender.send_frame("roi", t, frame, sensor_origin=CROP_ORIGIN)
        for t, frame in enumerate(full):
            sender.send_frame("full", t, frame)
        sender.close()

        def done() -> bool:
            m = metrics(metrics_port)
            return (
                m.get("pn2v_live_frames_ingested_total{source=zmq}") == 28
                and m.get("pn2v_live_backlog_frames{}") == 0
                and m.get("pn2v_live_training_rounds_total{outcome=promoted}", 0) >= 1
            )

        wait_for(done, 180, "28 frames denoised and a round promoted", process, log)
        m = metrics(metrics_port)
        assert m["pn2v_live_frames_rejected_total{reason=camera_maps,source=zmq}"] == 1
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert "rejected a message for big (camera_maps): camera maps: a 48×72 frame" in text
    assert "outside the camera maps" in text

    model = CameraNoiseModel(base, maps)
    registry = ModelRegistry(tmp_path / "store" / "models")
    store = Store(tmp_path / "store")
    try:
        assert "big" not in store.acquisitions()
        for name, raw, origin in (("roi", roi, CROP_ORIGIN), ("full", full, (0, 0))):
            acquisition = store.acquisition(name)
            assert acquisition.sensor_origin == (None if name == "full" else CROP_ORIGIN)
            region = maps.region(origin, raw.shape[1:])
            for t in range(len(raw)):
                assert np.array_equal(acquisition.read_raw(t), raw[t])  # stored as sent
                denoiser, _ = registry.load(acquisition.denoised_version(t))
                expected = denoise(denoiser, region.equalise(raw[t]), model, bf16=False,
                                   read_variance=region.pixel_variance())["denoised"]  # fmt: skip
                np.testing.assert_allclose(acquisition.read_denoised(t), expected, rtol=1e-4)
    finally:
        store.close()
