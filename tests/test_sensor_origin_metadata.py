"""Where frames lie on the sensor, from the file: Micro-Manager's per-image "ROI" (TIFF tag
51123, "x-y-width-height") selects the sCMOS camera maps' region in folder ingest, `denoise` and
`train`; files without it (OME-XML has no such field) leave it to --sensor-origin / the config."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import tifffile

from pn2v_live.core.noise import CameraNoiseModel
from pn2v_live.core.synthetic_scmos import ScmosCamera, scmos_maps
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.pipeline.folder_source import FolderSource
from pn2v_live.storage.images import read_stack_metadata
from pn2v_live.storage.store import Store
from pn2v_live.storage.tiff_reader import read_tiff


def write_micromanager_tiff(path, frames, roi: str, **options) -> None:
    """A TIFF with Micro-Manager's per-image metadata on every page, as Micro-Manager writes it."""
    meta = json.dumps({"Camera": "HamamatsuHam_DCAM", "ROI": roi, "Binning": "1x1"})
    tifffile.imwrite(path, frames, photometric="minisblack",
                     extratags=[(51123, "s", 0, meta, True)], **options)  # fmt: skip


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_micromanager_roi_is_read_and_a_roi_that_does_not_fit_the_frames_is_ignored(
    tmp_path, caplog
):
    frames = np.zeros((3, 24, 40), np.uint16)
    write_micromanager_tiff(tmp_path / "mm.tif", frames, "512-256-40-24")  # x-y-w-h
    write_micromanager_tiff(tmp_path / "mm.ome.tif", frames, "512-256-40-24", ome=True)
    for name in ("mm.tif", "mm.ome.tif"):
        stack, metadata = read_tiff(tmp_path / name)
        assert stack.shape == (3, 24, 40) and metadata.sensor_origin == (256, 512)  # row, col
        assert read_stack_metadata(tmp_path / name)[1].sensor_origin == (256, 512)
    write_micromanager_tiff(tmp_path / "cropped.tif", frames, "512-256-64-64")
    with caplog.at_level(logging.WARNING):
        assert read_tiff(tmp_path / "cropped.tif")[1].sensor_origin is None
    assert "does not describe its 24×40 frames" in caplog.text
    tifffile.imwrite(tmp_path / "plain.ome.tif", frames, ome=True, metadata={"axes": "TYX"})
    assert read_tiff(tmp_path / "plain.ome.tif")[1].sensor_origin is None


def test_folder_ingest_places_an_acquisition_at_its_micromanager_roi(tmp_path):
    maps = scmos_maps((48, 64), seed=5)
    raw = ScmosCamera(maps).acquisition(4, seed=6)[0]
    scope = tmp_path / "scope"
    (scope / "roi").mkdir(parents=True)
    (scope / "beyond").mkdir()
    write_micromanager_tiff(scope / "roi" / "img.tif", raw[:, 16:40, 24:56], "24-16-32-24")
    # the same size at an origin where it would lie beyond the maps: refused at ingest
    write_micromanager_tiff(scope / "beyond" / "img.tif", raw[:, 16:40, 24:56], "40-30-32-24")
    camera = CameraFrames(CameraNoiseModel.from_maps(maps, (100.0, 900.0)))
    store = Store(tmp_path / "store")
    source = FolderSource(store, [scope], stable_seconds=0.2, rescan_seconds=1.0,
                          check=camera.admit)  # fmt: skip
    source.start()
    try:
        wait_for(lambda: source.counts["stored_frames"] == 4 and source.counts["rejected_files"])
        acquisition = store.acquisition("roi")
        assert acquisition.sensor_origin == (16, 24) and camera.origin(acquisition) == (16, 24)
        equalised, variance = camera.inputs(acquisition, acquisition.read_raw(0))
        np.testing.assert_allclose(equalised, maps.equalise(raw[0])[16:40, 24:56], rtol=1e-6)
        np.testing.assert_array_equal(variance, maps.pixel_variance()[16:40, 24:56])
        item = store.source_items("folder").get(str((scope / "beyond" / "img.tif").resolve()))
        assert item.status == "rejected" and "outside the camera maps" in item.reason
        assert "beyond" not in store.acquisitions()
    finally:
        source.stop()
        store.close()


def test_train_and_denoise_read_the_roi_and_record_and_check_the_camera_maps(tmp_path, caplog):
    """`denoise` of a Micro-Manager crop without --sensor-origin reads its own region of the
    maps; the model records the maps it was trained with, and other maps (or none) are named in a
    WARNING."""
    from typer.testing import CliRunner

    from pn2v_live.core.noise import PoissonGaussianNoiseModel
    from pn2v_live.service.cli import app
    from pn2v_live.storage.camera_maps_file import save_camera_maps
    from pn2v_live.storage.checkpoints import load_denoiser
    from pn2v_live.storage.noise_model_file import save_noise_model

    def run(*args: str) -> None:
        result = CliRunner().invoke(app, [*args, "--device", "cpu"])
        assert result.exit_code == 0, (result.output, result.exception)

    maps, other = scmos_maps((64, 64), seed=11), scmos_maps((64, 64), seed=12)
    raw, _ = ScmosCamera(maps).acquisition(4, seed=11)
    crop = raw[:, 16:48, 8:40]
    write_micromanager_tiff(tmp_path / "mm.tif", raw, "0-0-64-64")
    write_micromanager_tiff(tmp_path / "mm_crop.tif", crop, "8-16-32-32")  # x 8, y 16
    tifffile.imwrite(tmp_path / "crop.tif", crop, photometric="minisblack")
    save_camera_maps(maps, tmp_path / "maps.tif")
    save_camera_maps(other, tmp_path / "other.tif")
    offset, gain = maps.reference
    save_noise_model(PoissonGaussianNoiseModel(gain, offset, 3.0, (100.0, 600.0)),
                     tmp_path / "plain.pt")  # fmt: skip
    run("train", str(tmp_path / "mm.tif"), "-o", str(tmp_path / "model.pt"), "--noise-model",
        str(tmp_path / "plain.pt"), "--camera-maps", str(tmp_path / "maps.tif"), "--steps", "2",
        "--k", "8", "--patch-size", "32", "--context", "0:0")  # fmt: skip
    assert load_denoiser(tmp_path / "model.pt")[1]["camera_maps_id"] == maps.content_id()
    outputs = {}
    for name, path, *origin in [("roi", "mm_crop.tif"), ("given", "crop.tif", "16,8")]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run("denoise", str(tmp_path / path), "-m", str(tmp_path / "model.pt"), "-o",
                str(tmp_path / f"{name}.tif"), "--tile", "32",
                *(["--sensor-origin", *origin] if origin else []))  # fmt: skip
        assert "camera maps" not in caplog.text  # the maps it was trained with
        outputs[name] = tifffile.imread(tmp_path / f"{name}.tif")
    # Read at (0, 0) instead, the crop would be equalised with other offsets (~1 ADU off).
    np.testing.assert_array_equal(outputs["roi"], outputs["given"])
    for option, path, expected in [("--camera-maps", "other.tif", other.content_id()),
                                   ("--noise-model", "plain.pt", "none are applied")]:  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run("denoise", str(tmp_path / "mm_crop.tif"), "-m", str(tmp_path / "model.pt"),
                "-o", str(tmp_path / "x.tif"), "--frames", "0:1", option,
                str(tmp_path / path))  # fmt: skip
        warning = next(r for r in caplog.records if "was trained with camera maps" in r.message)
        assert warning.levelname == "WARNING" and maps.content_id() in warning.message
        assert expected in warning.message
