"""A pass of inference or the trainer, and a poll of the viewer's acquisition list, cost what
may have changed, not the store's size: with many closed, denoised, week-old acquisitions in a
real store, passes and polls after the first list no folder and open no file of those
acquisitions (counted by Python's audit events for every file open and directory listing), and
a frame stored meanwhile is still found."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.pipeline.trainer import Trainer, TrainerSettings
from pn2v_live.service.viewer import ViewerServer
from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store

CLOSED = 2000
SHAPE = (16, 16)
WEEK = 7 * 86400


class FileWork:
    """Counts file opens and directory listings under `root` while `counting` (audit hook)."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.counting = False
        self.paths: list[str] = []
        sys.addaudithook(self._hook)  # cannot be removed: it only counts while asked to

    def _hook(self, event: str, args: tuple) -> None:
        if not self.counting or event not in ("open", "os.scandir", "os.listdir"):
            return
        path = args[0] if args else None
        if isinstance(path, str | Path) and str(path).startswith(self.root):
            self.paths.append(f"{event} {path}")

    def during(self, work) -> list[str]:
        self.paths, self.counting = [], True
        try:
            work()
        finally:
            self.counting = False
        return self.paths


@pytest.fixture(scope="module")
def file_work(tmp_path_factory):
    return FileWork(tmp_path_factory.getbasetemp())


def old_denoised_acquisitions(root: Path, count: int = CLOSED) -> None:
    """`count` closed acquisitions of one frame, denoised, last written a week ago: one
    made through the store, copied under other names, and recorded in the ledger."""
    store = Store(root, writer=True)
    template = store.create("old_0000", SHAPE, "uint16")
    template.write_raw(0, np.full(SHAPE, 100, np.uint16))
    template.write_denoised(0, np.full(SHAPE, 100.0, np.float32), 1)
    template.close()
    store.close()
    group = zarr.open_group(root / "old_0000.ome.zarr", mode="r+")
    group.attrs["pn2v_live"] = group.attrs["pn2v_live"] | {"last_frame_at": time.time() - WEEK}
    names = [f"old_{n:04d}" for n in range(1, count)]
    for name in names:
        shutil.copytree(root / "old_0000.ome.zarr", root / f"{name}.ome.zarr", copy_function=_copy)
    store = Store(root)
    store._ledger.record(
        frames=[(name, 0) for name in names],
        denoised=[(name, 0, 1, "0:0") for name in names],
    )
    store.close()


def _copy(source: str, target: str) -> None:
    """Chunk files (never rewritten here) as hard links, metadata as copies."""
    if Path(source).name.isdigit():
        Path(target).hardlink_to(source)
    else:
        shutil.copyfile(source, target)


def test_passes_cost_nothing_per_closed_acquisition(tmp_path, file_work):
    root = tmp_path / "store"
    old_denoised_acquisitions(root)
    store = Store(root, writer=True)
    registry = ModelRegistry(root / "models")
    torch.manual_seed(0)
    registry.promote(
        new_denoiser("pn2v", mean=100.0, std=50.0, k=4, depth=2, features=8),
        validation_loss=1.0, training_frames=1, training_steps=1, noise_model_id=None,
    )  # fmt: skip
    noise = PoissonGaussianNoiseModel(gain=2.0, offset=10.0, read_noise=3.0, signal_range=(0, 200))
    inference = InferenceScheduler(store, registry, noise, torch.device("cpu"), max_in_flight=4)
    settings = TrainerSettings(
        every_frames=1000, every_seconds=3600, steps_per_round=1, patch_size=16, batch_size=1,
        k=4, learning_rate=1e-3, context="0:0",
    )  # fmt: skip
    trainer = Trainer(
        store, registry, noise, "nm", settings, torch.device("cpu"), threading.Event()
    )
    live = store.create("live", SHAPE, "uint16")
    live.write_raw(0, np.full(SHAPE, 50, np.uint16))
    try:
        first = file_work.during(lambda: (inference.work(), trainer.work()))
        assert any("old_1999" in path for path in first)  # the first pass lists the store once
        assert live.denoised_version(0) == 1

        def passes() -> None:
            for _ in range(5):
                inference.work()
                trainer.work()

        later = file_work.during(passes)
        assert not any("old_" in path for path in later), later[:5]
        assert not any(path.endswith(str(root)) for path in later), later[:5]  # no listing
        live.write_raw(1, np.full(SHAPE, 60, np.uint16))  # stored meanwhile: found by the next
        old = store.acquisition("old_0500")
        old.write_raw(1, np.full(SHAPE, 70, np.uint16))  # an old acquisition given a frame
        found = file_work.during(inference.work)
        assert live.denoised_version(1) == 1 and old.denoised_version(1) == 1
        assert not any("old_0499" in path or "old_0501" in path for path in found)
        assert {a.name for a in inference.working.acquisitions()} == {"live", "old_0500"}
        assert trainer.work() is False  # 2 new frames: no round due
        assert trainer.working.stored == {"live": 1, "old_0500": 1}  # new ones, not all it has
    finally:
        store.close()


def acquisitions(server: ViewerServer) -> dict[str, dict]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("GET", "/api/acquisitions")
    listed = json.loads(connection.getresponse().read())
    connection.close()
    return {summary["name"]: summary for summary in listed}


def test_viewer_list_polls_cost_nothing_per_settled_acquisition(tmp_path, file_work):
    root = tmp_path / "store"
    old_denoised_acquisitions(root, 300)  # the first poll opens each: fewer keep it short
    store = Store(root, writer=True)  # opening the ledger changes the folder
    server = ViewerServer(store, "127.0.0.1:0", status=dict)
    server.start()
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(root, ns=(an_hour_ago, an_hour_ago))  # the folder was last changed a while ago
    try:
        assert len(acquisitions(server)) == 300
        later = file_work.during(lambda: [acquisitions(server) for _ in range(5)])
        assert not any("old_" in path for path in later), later[:5]
        assert not any(path.endswith(str(root)) for path in later), later[:5]  # no listing
        store.acquisition("old_0100").write_raw(1, np.full(SHAPE, 70, np.uint16))
        live = store.create("live", SHAPE, "uint16")  # a new folder: listed again
        live.write_raw(0, np.full(SHAPE, 50, np.uint16))
        found = file_work.during(lambda: acquisitions(server))
        summaries = acquisitions(server)
        assert (summaries["old_0100"]["frames"], summaries["old_0100"]["lag"]) == (2, 1)
        assert summaries["live"]["frames"] == 1 and len(summaries) == 301
        assert not any("old_0101" in path or "old_0099" in path for path in found), found[:5]
        live.write_denoised(0, np.full(SHAPE, 50.0, np.float32), 1)
        assert acquisitions(server)["live"]["lag"] == 0  # settled: summarised only on news
        live.close()
        assert acquisitions(server)["live"]["closed"]
    finally:
        server.stop()
        store.close()
