"""`pn2v-live serve` end to end, with real processes, real sockets and real microscope data.

A 96×96 crop of fov03's 50 frames, played 4× (200 frames) by `pn2v-live simulate` over
ZeroMQ; noise model calibrated from fov01; a small training budget (K = 64). Checked: every
frame gets a denoised twin, the denoised frames beat the raw ones against fov03's ground truth,
the metrics count exactly the frames, SIGTERM exits 0 with a consistent store, and SIGKILL in
the middle of training and inference loses no frame and no promoted model — also with inference
on a dask.distributed LocalCluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from conftest import free_port, thread_heaps
from prometheus_client.parser import text_string_to_metric_families
from serve_files import listeners

from pn2v_live.core.metrics import psnr
from pn2v_live.core.model import new_denoiser
from pn2v_live.storage.checkpoints import save_denoiser
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store

CLI = Path(sys.executable).with_name("pn2v-live")
CROP = (slice(0, 96), slice(0, 96))
FRAMES = 200
ACQUISITION = "fov03"
MARGIN_DB = 1.5  # denoised must beat raw by at least this much (PSNR vs gt, range 255)
PSNR_FRAMES = range(FRAMES - 5, FRAMES)  # the newest: denoised first by every new model
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}

# Minutes on a busy 2-core machine: over the suite's default per-test timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def data(data_dir, tmp_path_factory):
    """fov03 crop as a stack file, its ground truth, and a noise model calibrated from fov01."""
    folder = tmp_path_factory.mktemp("e2e-data")
    fmd = data_dir / "fmd_confocal_bpae"
    raw = tifffile.imread(fmd / "fov03" / "raw.tif")[:, CROP[0], CROP[1]]
    gt = tifffile.imread(fmd / "fov03" / "gt.tif")[CROP].astype(np.float32)
    tifffile.imwrite(folder / "fov03.tif", raw)
    noise_model = folder / "noise-model.pt"
    subprocess.run(
        [CLI, "calibrate", fmd / "fov01" / "raw.tif", "-o", noise_model, "--kind", "histogram"],
        check=True,
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    return {"stack": folder / "fov03.tif", "raw": raw, "gt": gt, "noise_model": noise_model}


class Serve:
    """One `pn2v-live serve` process on free ports, with helpers to watch it from outside."""

    def __init__(self, folder: Path, data: dict, scheduler: str = "local"):
        self.folder, self.data = folder, data
        self.store = folder / "store"
        self.zmq = f"tcp://127.0.0.1:{free_port(pairs=True)}"
        self.metrics_port = free_port()
        self.viewer_port = free_port()
        listening = listeners(
            metrics=f"127.0.0.1:{self.metrics_port}",
            viewer=f"127.0.0.1:{self.viewer_port}",
            publish=f"tcp://127.0.0.1:{free_port()}",
        )
        self.config = folder / "serve.toml"
        self.config.write_text(
            f"""
[store]
root = "store"
[noise_model]
path = "{data["noise_model"]}"
[model]
keep_versions = 1000  # a check loads the version promoted before a kill, many rounds ago
[ingest.zmq]
bind = "{self.zmq}"
[trainer]
device = "cpu"
every_frames = 50
every_seconds = 1
steps_per_round = 15
first_model_frames = 4
first_model_steps = 15
min_gain_db = -inf  # this test is about frames surviving kills, not about model quality
patch_size = 48
batch_size = 4
k = 64
[inference]
scheduler = "{scheduler}"
max_in_flight = 4
device = "cpu"
compile = {"true" if scheduler == "local" else "false"}
{listening}"""
        )
        self.log = folder / "serve.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [CLI, "serve", "--config", self.config], stdout=log, stderr=log, env=ENV
            )
        wait_for(lambda: self.metrics() is not None, 90, "metrics endpoint", self)

    def metrics(self) -> dict[str, float] | None:
        """Scraped samples as {"name{label=value}": value}; None while not listening."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
            ) as r:
                text = r.read().decode()
        except OSError:
            return None
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def stream(self, fps: float = 40, frames: int = FRAMES) -> subprocess.Popen:
        """`pn2v-live simulate` playing the stack's 50 frames, cycled, as frames 0 .. frames-1."""
        return subprocess.Popen(
            [
                CLI,
                "simulate",
                "--to",
                self.zmq,
                "--source",
                self.data["stack"],
                "--frames",
                str(frames),
                "--fps",
                str(fps),
                "--acquisition",
                ACQUISITION,
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def denoised(self, t: int) -> np.ndarray:
        """Denoised frame t, read with zarr while the daemon runs (no Store in this process)."""
        return zarr.open_array(self.store / f"{ACQUISITION}.ome.zarr" / "denoised" / "0", mode="r")[
            t, 0, 0
        ]

    def model_version(self) -> int | None:
        pointer = self.store / "models" / "current"
        return int(pointer.read_text()) if pointer.exists() else None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(condition, timeout: float, what: str, serve: Serve | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if serve is not None and serve.process.poll() is not None:
            log = serve.log.read_text()[-3000:]
            pytest.fail(f"serve exited ({serve.process.returncode}) waiting for {what}:\n{log}")
        time.sleep(1)
    log = serve.log.read_text()[-3000:] if serve else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")


def psnr_gain(serve: Serve) -> float:
    """Mean PSNR of denoised minus raw over PSNR_FRAMES (frames t and t+50k show the same scene)."""
    raw, gt = serve.data["raw"], serve.data["gt"]
    noisy = np.mean([psnr(raw[t % 50].astype(np.float32), gt, 255) for t in PSNR_FRAMES])
    denoised = np.mean([psnr(serve.denoised(t), gt, 255) for t in PSNR_FRAMES])
    return float(denoised - noisy)


def all_denoised_and_better(serve: Serve, ingested: int) -> bool:
    """`ingested` frames stored, none without a twin, a model promoted, twins beat raw."""
    m = serve.metrics() or {}
    if m.get("pn2v_live_frames_ingested_total{source=zmq}", 0) < ingested:
        return False
    if m.get("pn2v_live_backlog_frames{}", 1) != 0 or serve.model_version() is None:
        return False
    return psnr_gain(serve) >= MARGIN_DB


def check_store(folder: Path, data: dict) -> ModelRegistry:
    """After a clean stop: each frame stored once, bit-identical, each with a denoised twin."""
    store = Store(folder / "store")
    try:
        acquisition = store.acquisition(ACQUISITION)
        assert acquisition.stored_frames() == list(range(FRAMES))
        assert acquisition.valid_t == FRAMES
        for t in range(FRAMES):
            assert np.array_equal(acquisition.read_raw(t), data["raw"][t % 50])
            assert acquisition.denoised_version(t) is not None
            assert acquisition.read_denoised(t).std() > 0
    finally:
        store.close()
    registry = ModelRegistry(folder / "store" / "models")
    registry.load()  # the promoted checkpoint is complete
    return registry


def test_serve_denoises_every_frame_better_than_raw_and_counts_them(tmp_path, data):
    serve = Serve(tmp_path, data)
    serve.start()
    try:
        sender = serve.stream()
        assert sender.wait(timeout=120) == 0, sender.stderr.read()
        wait_for(lambda: all_denoised_and_better(serve, FRAMES), 420, "every frame denoised", serve)
        m = serve.metrics()
        assert m["pn2v_live_frames_ingested_total{source=zmq}"] == FRAMES
        assert m["pn2v_live_frames_denoised_total{kind=new}"] == FRAMES
        assert not any(k.startswith("pn2v_live_frames_rejected_total") and v for k, v in m.items())
        assert m["pn2v_live_model_version{}"] >= 1
        assert m["pn2v_live_training_rounds_total{outcome=promoted}"] >= 1
        assert m["pn2v_live_inference_seconds_count{}"] >= FRAMES
        assert np.isfinite(m["pn2v_live_validation_loss{}"])
        assert thread_heaps(serve.process.pid) == 0  # every thread allocates from one heap
        with urllib.request.urlopen(
            f"http://127.0.0.1:{serve.viewer_port}/api/status", timeout=5
        ) as r:
            assert b'"model_version"' in r.read()
        assert serve.stop() == 0
    finally:
        serve.kill()
    registry = check_store(tmp_path, data)
    assert registry.current().validation_loss is not None
    log = serve.log.read_text()
    assert "Traceback" not in log and "level=ERROR" not in log
    # Quiet at INFO: start/stop, one line per training round and model swap, never per frame.
    rounds = log.count("component=trainer")
    assert len(log.splitlines()) <= 2 * rounds + 15, log


@pytest.fixture
def local_cluster():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        worker_dashboard_address=None,
    ) as cluster:
        yield cluster


def test_sigkill_mid_training_and_inference_loses_nothing_on_a_local_cluster(
    tmp_path, data, local_cluster
):
    serve = Serve(tmp_path, data, scheduler=local_cluster.scheduler_address)
    serve.start()
    sender = serve.stream(fps=100, frames=FRAMES // 2)
    try:
        assert sender.wait(timeout=120) == 0, sender.stderr.read()
        wait_for(serve.model_version, 300, "the first promotion", serve)
        # Resend the whole stream (the first half are duplicates, ignored) and kill the daemon
        # while new frames arrive: inference has a backlog, the trainer is inside a round
        # (every_seconds = 1), paused for inference or stepping.
        sender = serve.stream(fps=50)
        ingested = "pn2v_live_frames_ingested_total{source=zmq}"
        wait_for(lambda: (serve.metrics() or {}).get(ingested, 0) >= 140, 120, "140 frames", serve)
        promoted = serve.model_version()
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait()
        sender.kill()
        sender.wait()
        # What survived on disk: the promoted model and every frame stored before the kill.
        registry = ModelRegistry(tmp_path / "store" / "models")
        assert registry.current().version >= promoted
        promoted = registry.current().version
        registry.load()
        store = Store(tmp_path / "store")
        stored = len(store.acquisition(ACQUISITION).stored_frames())
        without_twin = len(store.acquisition(ACQUISITION).frames_without_twin())
        store.close()
        assert 140 <= stored < FRAMES
        assert without_twin > 0

        serve.start()
        sender = serve.stream(fps=200)  # the whole stream again
        assert sender.wait(timeout=120) == 0, sender.stderr.read()
        wait_for(
            lambda: all_denoised_and_better(serve, FRAMES - stored),
            600,
            "every frame denoised after the restart",
            serve,
        )
        m = serve.metrics()
        assert m["pn2v_live_frames_ingested_total{source=zmq}"] == FRAMES - stored
        # Twins missing at the kill are picked up again, each exactly once.
        assert m["pn2v_live_frames_denoised_total{kind=new}"] == FRAMES - stored + without_twin
        assert serve.model_version() >= promoted
        assert serve.stop() == 0
    finally:
        sender.kill()
        serve.kill()
    registry = check_store(tmp_path, data)
    assert registry.load(promoted)[1].version == promoted  # promoted before the kill: kept
    # The frames were denoised by the cluster's worker process, not in the daemon.
    assert local_cluster.scheduler.task_prefixes["denoise_frame"].duration_average > 0


def test_folder_ingest_denoised_by_the_initial_model_before_any_training(tmp_path, data):
    """Frames written into a watched folder are denoised by `[model] initial` meanwhile."""
    torch.manual_seed(0)
    save_denoiser(new_denoiser("pn2v", 60.0, 30.0, k=8, depth=2, features=8), tmp_path / "start.pt")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    serve = Serve(tmp_path, data)
    text = serve.config.read_text().replace("every_frames = 50", "every_frames = 1000")
    text = text.replace("every_seconds = 1", "every_seconds = 3600")
    text = text.replace("[model]\n", '[model]\ninitial = "start.pt"\n')
    serve.config.write_text(text + f'[ingest.folder]\npaths = ["{incoming}"]\n')
    serve.start()
    try:
        writer = subprocess.run(
            [
                CLI,
                "simulate",
                "--folder",
                incoming,
                "--source",
                data["stack"],
                "--frames",
                "12",
                "--fps",
                "50",
                "--acquisition",
                "folder-run",
            ],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert writer.returncode == 0, writer.stderr
        url = f"http://127.0.0.1:{serve.viewer_port}/api/acquisitions"

        def all_denoised():
            with urllib.request.urlopen(url, timeout=5) as response:
                summary = {a["name"]: a for a in json.load(response)}
            run = summary.get("folder-run", {})
            return run.get("frames") == 12 and run.get("lag") == 0

        wait_for(all_denoised, 120, "12 folder frames denoised", serve)
        with urllib.request.urlopen(f"http://127.0.0.1:{serve.viewer_port}/api/status") as r:
            status = json.load(r)
        assert status["model_version"] == 1
        assert status["model_source"].endswith("start.pt")
        m = serve.metrics()
        assert m["pn2v_live_frames_ingested_total{source=folder}"] == 12
        assert m["pn2v_live_frames_denoised_total{kind=new}"] == 12
        assert serve.stop() == 0
    finally:
        serve.kill()
    assert sorted(p.name for p in incoming.rglob("*.tif*"))  # sources are left in place
