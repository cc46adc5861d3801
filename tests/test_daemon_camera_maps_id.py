"""The daemon and the sCMOS camera maps' id: the registry records it with the model it imports
(as `train` recorded it), the status shows the maps applied beside the noise model's id, and a
restart with other maps, or none, warns naming both ids and goes on with the model."""

from __future__ import annotations

import json
import logging

import pytest

from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import CameraNoiseModel
from pn2v_live.core.synthetic_scmos import scmos_maps
from pn2v_live.service.config import load_config
from pn2v_live.service.daemon import Daemon
from pn2v_live.service.notify import SystemdNotifier
from pn2v_live.storage.camera_maps_file import save_camera_maps
from pn2v_live.storage.checkpoints import save_denoiser
from pn2v_live.storage.noise_model_file import save_noise_model

pytestmark = pytest.mark.timeout(300)


def start_and_close(tmp_path, caplog, maps: str | None) -> tuple[dict, list[logging.LogRecord]]:
    """Start a daemon on the store in `tmp_path` with camera maps file `maps` (None: none), and
    return its noise-model status and the warnings it logged; it is closed after."""
    sockets = ("ingest.zmq.bind", "metrics.bind", "viewer.bind", "publish.bind")
    config = load_config(
        None,
        [
            f'store.root="{tmp_path / "store"}"',
            f'noise_model.path="{tmp_path / "noise.pt"}"',
            f'model.initial="{tmp_path / "initial.pt"}"',
            *(f'{key}=""' for key in sockets),
            *([f'camera.maps="{tmp_path / maps}"'] if maps else []),
            "trainer.device=cpu",
            "inference.device=cpu",
            "inference.compile=false",
        ],
    )
    daemon = Daemon(config, SystemdNotifier(environ={}))
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            daemon.start()
        warnings = [r for r in caplog.records if "camera maps" in r.getMessage()]
        return daemon.noise_model_status(), warnings
    finally:
        daemon.close()


def test_registry_status_and_start_warning_carry_the_camera_maps_id(tmp_path, caplog):
    maps, other = scmos_maps((32, 32), seed=3), scmos_maps((32, 32), seed=4)
    save_camera_maps(maps, tmp_path / "maps.tif")
    save_camera_maps(other, tmp_path / "other.tif")
    # a noise model file without maps: `camera.maps` gives them (or not)
    save_noise_model(CameraNoiseModel.from_maps(maps, (100.0, 600.0)).base, tmp_path / "noise.pt")
    # what `train --camera-maps maps.tif` records with its model
    save_denoiser(new_denoiser("pn2v", 300.0, 100.0, k=8, depth=2, features=8),
                  tmp_path / "initial.pt", {"camera_maps_id": maps.content_id()})  # fmt: skip

    status, warnings = start_and_close(tmp_path, caplog, "maps.tif")
    entry = json.loads((tmp_path / "store" / "models" / "v0001.json").read_text())
    assert entry["camera_maps_id"] == maps.content_id()  # imported with the id `train` recorded
    assert status["camera_maps_id"] == maps.content_id() and status["id"]
    assert warnings == []  # the maps it was trained with

    status, (warning,) = start_and_close(tmp_path, caplog, "other.tif")
    assert status["camera_maps_id"] == other.content_id()
    assert warning.levelname == "WARNING" and warning.name == "pn2v_live.daemon"
    text = warning.getMessage()
    assert "model version 1" in text and f"trained with camera maps {maps.content_id()}" in text
    assert f"not with the maps {other.content_id()}" in text

    status, (warning,) = start_and_close(tmp_path, caplog, None)
    assert status["camera_maps_id"] is None
    text = warning.getMessage()
    assert f"trained with camera maps {maps.content_id()}, but none are applied" in text
    assert "camera.maps" in text  # the daemon's setting, not `denoise`'s option
    # the daemon goes on with the model it resumes from: no new version
    assert sorted(p.name for p in (tmp_path / "store" / "models").glob("v*.json")) == ["v0001.json"]
