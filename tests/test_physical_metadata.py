"""Physical metadata end to end: an OME-TIFF stack with 0.065 µm pixels and a 0.5 s frame interval
keeps them through folder ingest and ZeroMQ (header fields) into a real `pn2v-live serve` store,
read back with ome-zarr-py's Reader, and through `pn2v-live denoise` into an OME-TIFF read back
with tifffile; `denoise --dtype uint16` rounds and clips the float result and says how much."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
import zmq
from conftest import free_port
from ome_zarr.io import parse_url
from ome_zarr.reader import Multiscales, Reader
from serve_files import CPU_WITHOUT_TRAINING, listeners, save_camera_noise_model

from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.storage.checkpoints import save_denoiser
from pn2v_live.storage.ledger import LEDGER_FILE
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.physical import Physical
from pn2v_live.storage.registry import content_id
from pn2v_live.storage.store import Store
from pn2v_live.storage.tiff_metadata import read_metadata
from pn2v_live.wire.protocol import ProtocolError, decode_message, encode_frame
from pn2v_live.wire.sender import FrameSender

CLI = Path(sys.executable).with_name("pn2v-live")
PIXEL_UM, INTERVAL_S = 0.065, 0.5
PHYSICAL = Physical((PIXEL_UM, PIXEL_UM), interval_s=INTERVAL_S)
SCALE = [INTERVAL_S, 1.0, 1.0, PIXEL_UM, PIXEL_UM]  # t, c, z, y, x
FRAMES, SHAPE = 4, (32, 40)

pytestmark = pytest.mark.timeout(600)


def frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 4000, (FRAMES, *SHAPE), dtype=np.uint16)


def write_ome_tiff(path: Path, stack: np.ndarray) -> None:
    """A stack as a microscope's OME-TIFF: 0.065 µm pixels, 0.5 s apart, channel "GFP"."""
    metadata = {"axes": "TYX", "PhysicalSizeX": PIXEL_UM, "PhysicalSizeY": PIXEL_UM}
    metadata |= {"PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm", "TimeIncrement": INTERVAL_S}
    metadata |= {"TimeIncrementUnit": "s", "Channel": {"Name": "GFP"}}
    tifffile.imwrite(path, stack, photometric="minisblack", metadata=metadata, ome=True)


def images(path: Path) -> dict[str, object]:
    """The image nodes ome-zarr-py's Reader finds at `path`, by name."""
    nodes = list(Reader(parse_url(str(path)))())
    return {node.metadata["name"]: node for node in nodes if node.load(Multiscales)}


@pytest.mark.parametrize(
    "write, expected",
    [
        ("ome", Physical((0.065, 0.065), None, 0.5)),
        ("imagej", Physical((0.2, 0.1), 0.3, 2.0)),
        ("centimetre", Physical((0.25, 0.5))),
        ("inch", Physical()),  # graphics software's DPI, not a pixel size
        ("plain", Physical()),
    ],
)
def test_sizes_are_read_from_ome_imagej_and_resolution_tags(tmp_path, write, expected):
    path, stack = tmp_path / "image.tif", frames(0)
    if write == "ome":
        write_ome_tiff(path, stack)
    elif write == "imagej":
        metadata = {"axes": "TYX", "unit": "um", "spacing": 0.3, "finterval": 2, "tunit": "sec"}
        tifffile.imwrite(path, stack, imagej=True, resolution=(10, 5), metadata=metadata)
    elif write == "centimetre":
        tifffile.imwrite(
            path,
            stack,
            resolution=(2e4, 4e4),
            resolutionunit="CENTIMETER",
            photometric="minisblack",
        )
    elif write == "inch":
        tifffile.imwrite(
            path, stack, resolution=(72, 72), resolutionunit="INCH", photometric="minisblack"
        )
    else:
        tifffile.imwrite(path, stack, photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        assert read_metadata(tif).physical == expected


@pytest.mark.parametrize(
    "fields",
    [
        {"pixel_size_um": [-0.065, 0.065]},
        {"pixel_size_um": [0.065]},
        {"pixel_size_um": "0.065"},
        {"pixel_size_um": [0.065, True]},
        {"interval_s": 0},
        {"interval_s": "0.5"},
        {"interval_s": float("inf")},
    ],
)
def test_bad_physical_header_fields_are_refused_with_the_reason(fields):
    header, pixels = encode_frame("cells", 0, frames(0)[0])
    bad = json.dumps(json.loads(header) | fields).encode()
    with pytest.raises(ProtocolError) as refused:
        decode_message([bad, bytes(pixels)], storable=True)
    assert refused.value.reason == "field"
    assert "pixel" in str(refused.value) or "interval" in str(refused.value)


def test_folder_and_zmq_frames_keep_pixel_size_and_interval_in_the_store(tmp_path):
    """A real daemon: an OME-TIFF dropped into a watched folder and frames sent with
    `pixel_size_um`/`interval_s`; a message with a bad pixel size is refused with the reason.
    The store's raw and denoised images both carry the scale, with units, for ome-zarr-py."""
    watched = tmp_path / "watched"
    (watched / "folder01").mkdir(parents=True)
    port = free_port(pairs=True)
    endpoint = f"tcp://127.0.0.1:{port}"
    save_camera_noise_model(tmp_path / "nm.pt", white=4095)
    initial = new_denoiser("n2v", mean=2000.0, std=1000.0, depth=2, features=8)
    save_denoiser(initial, tmp_path / "initial.pt")
    (tmp_path / "serve.toml").write_text(
        f"""
[store]
root = "store"
[noise_model]
path = "nm.pt"
refine = false
[model]
initial = "initial.pt"
[ingest.folder]
paths = ["{watched}"]
stable_seconds = 0.2
[ingest.zmq]
bind = "{endpoint}"
{CPU_WITHOUT_TRAINING}{listeners()}"""
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [CLI, "serve", "--config", "serve.toml"], cwd=tmp_path, stdout=out, stderr=out
        )
    try:
        wait_for(lambda: "serving store" in log.read_text(), serve, log)
        write_ome_tiff(watched / "folder01" / "stack.ome.tif", frames(1))
        with FrameSender(endpoint) as sender:
            sender.send_stack("zmq01", frames(2), physical=PHYSICAL)
            sender.ensure_stored("zmq01", frames(2), physical=PHYSICAL)
        with zmq.Context() as context, context.socket(zmq.PUSH) as push:
            push.connect(endpoint)
            header, pixels = encode_frame("bad01", 0, frames(3)[0])
            bad = json.loads(header) | {"pixel_size_um": [0, PIXEL_UM]}
            push.send_multipart([json.dumps(bad).encode(), bytes(pixels)])
            push.close(linger=2000)
        wait_for(lambda: twins(tmp_path / "store") == {"folder01": FRAMES, "zmq01": FRAMES},
                 serve, log)  # fmt: skip
        wait_for(lambda: "pixel size must be a positive finite number" in log.read_text(),
                 serve, log)  # fmt: skip
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(120) == 0, log.read_text()[-3000:]
    assert not (tmp_path / "store" / "bad01.ome.zarr").exists()
    for name, seed in (("folder01", 1), ("zmq01", 2)):
        found = images(tmp_path / "store" / f"{name}.ome.zarr")
        assert list(found) == ["raw", "denoised"]
        for node in found.values():
            assert node.metadata["coordinateTransformations"] == [
                [{"type": "scale", "scale": SCALE}]
            ]
            units = {axis["name"]: axis.get("unit") for axis in node.metadata["axes"]}
            assert units == {"t": "second", "c": None, "z": None, "y": "micrometer",
                             "x": "micrometer"}  # fmt: skip
        np.testing.assert_array_equal(np.asarray(found["raw"].data[0][:, 0, 0]), frames(seed))
        assert np.asarray(found["denoised"].data[0]).any()  # denoised, not the fill value
        assert Store(tmp_path / "store").acquisition(name).physical == PHYSICAL


def test_denoise_writes_an_ome_tiff_with_the_inputs_metadata(tmp_path):
    stack = frames(4)
    write_ome_tiff(tmp_path / "in.ome.tif", stack)
    save_noise_model(
        PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 4095)),
        tmp_path / "nm.pt",
    )
    save_denoiser(new_denoiser("pn2v", 2000.0, 1000.0, k=8, depth=2, features=8), tmp_path / "m.pt")
    done = pn2v_live("denoise", "in.ome.tif", "-m", "m.pt", "-o", "out.ome.tif",
                     "--noise-model", "nm.pt", "--frames", "1:4", cwd=tmp_path)  # fmt: skip
    assert json.loads(done.stdout.strip().splitlines()[-1])["dtype"] == "float32"
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as tif:
        series = tif.series[0]
        assert (series.axes, series.shape, series.dtype) == ("TYX", (3, *SHAPE), np.float32)
        metadata = read_metadata(tif)
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    assert metadata.physical == PHYSICAL and metadata.channel == "GFP denoised"
    description = image["Description"]
    assert f"model m.pt version id {content_id(tmp_path / 'm.pt')}" in description
    assert f"noise model {content_id(tmp_path / 'nm.pt')}" in description


def test_denoise_dtype_uint16_is_the_float_result_rounded_and_clipped(tmp_path):
    write_ome_tiff(tmp_path / "in.ome.tif", frames(5))
    # An untrained network with its output spread wide: values fall beyond uint16's range.
    denoiser = new_denoiser("n2v", 30000.0, 1e5, depth=2, features=8)
    with torch.no_grad():
        denoiser.net.head.weight.mul_(100)
    save_denoiser(denoiser, tmp_path / "m.pt")
    pn2v_live("denoise", "in.ome.tif", "-m", "m.pt", "-o", "float.tif", cwd=tmp_path)
    done = pn2v_live("denoise", "in.ome.tif", "-m", "m.pt", "-o", "u16.ome.tif",
                     "--dtype", "uint16", cwd=tmp_path)  # fmt: skip
    exact = tifffile.imread(tmp_path / "float.tif")
    rounded = np.rint(exact)
    clipped = int(np.count_nonzero((rounded < 0) | (rounded > 65535)))
    assert clipped > 0
    written = tifffile.imread(tmp_path / "u16.ome.tif")
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written, np.clip(rounded, 0, 65535).astype(np.uint16))
    assert json.loads(done.stdout.strip().splitlines()[-1])["clipped_pixels"] == clipped
    assert f"clipped {clipped} of {exact.size} pixels to the uint16 range" in done.stderr
    with tifffile.TiffFile(tmp_path / "u16.ome.tif") as tif:
        assert read_metadata(tif).physical == PHYSICAL


def pn2v_live(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pn2v_live", *args, "--device", "cpu"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert completed.returncode == 0, completed.stderr
    return completed


def twins(root: Path) -> dict[str, int]:
    """Denoised frames per acquisition that the ledger records."""
    try:
        with sqlite3.connect(root / LEDGER_FILE, timeout=10) as db:
            query = "SELECT acquisition, count(*) FROM denoised GROUP BY acquisition"
            return dict(db.execute(query).fetchall())
    except sqlite3.OperationalError:  # not created yet
        return {}


def wait_for(condition, serve: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert serve.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_first_sizes_known_stay_and_older_acquisitions_get_the_image_listing(tmp_path, caplog):
    store = Store(tmp_path / "store", writer=True)
    acquisition = store.create("late01", SHAPE, "uint16")  # the first frame said nothing
    assert acquisition.physical == Physical()
    store.create("late01", SHAPE, "uint16", PHYSICAL)  # a later one does
    acquisition.note_physical(Physical((1.0, 1.0)))  # and another differs: kept, logged
    assert acquisition.physical == PHYSICAL
    assert "keeps its first ones" in caplog.text
    store.close()
    path = tmp_path / "store" / "late01.ome.zarr"
    group = zarr.open_group(path, mode="r+")
    del group.attrs["labels"]  # as made before the listing
    assert list(images(path)) == []
    Store(tmp_path / "store", writer=True).acquisition("late01")
    found = images(path)
    assert list(found) == ["raw", "denoised"]
    assert found["denoised"].metadata["coordinateTransformations"][0][0]["scale"] == SCALE
