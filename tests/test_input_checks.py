"""Inputs checked: colour and multi-channel images are refused (not denoised as 128 frames of
128x3), `evaluate` says what it cannot compare and which PSNR range it uses, `ingest --data` on a
path that cannot be written is one error line. Real files written and read back, real CLI
processes checked for their exit code and message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pn2v_live.core.metrics import psnr, psnr_star
from pn2v_live.core.model import new_denoiser
from pn2v_live.errors import UserError
from pn2v_live.storage.checkpoints import save_denoiser
from pn2v_live.storage.images import read_stack
from pn2v_live.storage.images import write_tiff as write_grey_tiff

CLI = Path(sys.executable).with_name("pn2v-live")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
RNG = np.random.default_rng(0)


def cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [str(CLI), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, and exactly one `error:` line holding every fragment."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def write_tiff(path: Path, data: np.ndarray, **options) -> Path:
    with warnings.catch_warnings():  # tifffile's notice about (3, Y, X) defaulting to RGB
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(path, data, **options)
    return path


@pytest.fixture(scope="module")
def rgb_tiff(tmp_path_factory) -> Path:
    """A 128x128 RGB TIFF, as a camera app or an RGB export from Fiji writes it."""
    folder = tmp_path_factory.mktemp("rgb")
    return write_tiff(folder / "cells_rgb.tif", RNG.integers(0, 255, (128, 128, 3), np.uint8))


COLOUR_FILES = {
    "rgb": ((128, 128, 3), np.uint8, {}, "a colour image (RGB, 3 samples per pixel"),
    "rgba": ((64, 64, 4), np.uint8, {}, "a colour image (RGB, 4 samples per pixel"),
    "rgb-stack": ((5, 64, 64, 3), np.uint16, {"photometric": "rgb"}, "axes QYXS"),
    # tifffile's default for a (3, Y, X) array: RGB with separate planes, maybe 3 grey frames
    "planar-rgb": ((3, 64, 64), np.uint16, {}, "photometric='minisblack'"),
    # an RGB array saved as grey pages: 128 "frames" of 128x3
    "samples-as-pages": ((128, 128, 3), np.uint8, {"photometric": "minisblack"}, "128x3 pixels"),
    "imagej-channels": (
        (3, 64, 64), np.uint16, {"imagej": True, "metadata": {"axes": "CYX"}}, "3 channels",
    ),
    "ome-time-channels": (
        (4, 2, 64, 64), np.uint16, {"metadata": {"axes": "TCYX"}}, "imread('x.ome.tif')[:, 0]",
    ),
    "ome-z-channels": ((3, 2, 64, 64), np.uint16, {"metadata": {"axes": "ZCYX"}}, "2 channels"),
    "palette": (
        (64, 64), np.uint8, {"photometric": "palette", "colormap": np.zeros((3, 256), np.uint16)},
        "palette colour",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", COLOUR_FILES)
def test_colour_and_multi_channel_tiffs_are_refused_saying_how_to_pick_one(tmp_path, kind):
    shape, dtype, options, says = COLOUR_FILES[kind]
    name = "x.ome.tif" if kind.startswith("ome") else "x.tif"
    path = write_tiff(tmp_path / name, np.zeros(shape, dtype), **options)
    with pytest.raises(UserError) as refused:
        read_stack(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and says in message, message
    assert "\n" not in message


def test_colour_png_and_non_finite_float_tiff_are_refused(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(UserError, match=r"a colour image \(PNG mode RGB\)"):
        read_stack(tmp_path / "rgb.png")
    frames = RNG.normal(100, 5, (2, 32, 32)).astype(np.float32)
    frames[1, 3, 4] = np.nan
    frames[0, 0, 0] = np.inf
    write_tiff(tmp_path / "nan.tif", frames)
    with pytest.raises(UserError, match=r"2 of 2048 pixels are NaN or infinite"):
        read_stack(tmp_path / "nan.tif")


def test_grey_stacks_still_read_as_written(tmp_path, caplog):
    """What must not be refused: 3 or 4 grey frames saved as such, a 16-bit PNG, an OME-TIFF
    with one channel, and one of channels only (tifffile's axes for any 3-D array saved as
    *.ome.tif), read as frames with a warning."""
    three = RNG.integers(0, 4000, (3, 64, 64), np.uint16)
    write_tiff(tmp_path / "three.tif", three, photometric="minisblack")
    np.testing.assert_array_equal(read_stack(tmp_path / "three.tif"), three)
    four = RNG.integers(0, 4000, (4, 1, 48, 40), np.uint16)
    write_tiff(tmp_path / "four.ome.tif", four, metadata={"axes": "TCYX"})
    np.testing.assert_array_equal(read_stack(tmp_path / "four.ome.tif"), four[:, 0])
    Image.fromarray(three[0]).save(tmp_path / "grey16.png")
    np.testing.assert_array_equal(read_stack(tmp_path / "grey16.png"), three[:1])
    frames = RNG.integers(0, 4000, (40, 32, 32), np.uint16)
    write_tiff(tmp_path / "frames.ome.tif", frames)  # no axes given: tifffile says CYX
    with tifffile.TiffFile(tmp_path / "frames.ome.tif") as tif:
        assert tif.series[0].axes == "CYX"
    with caplog.at_level("WARNING", logger="pn2v_live.storage.tiff_reader"):
        np.testing.assert_array_equal(read_stack(tmp_path / "frames.ome.tif"), frames)
    assert "reading its 40 channels as 40 frames" in caplog.text


def test_stacks_of_3_or_4_frames_are_written_grey_and_read_back(tmp_path):
    """`denoise --frames 0:3` writes 3 frames: tagged grey-scale, not RGB (tifffile's guess)."""
    for count in (3, 4):
        frames = RNG.normal(100, 5, (count, 32, 32)).astype(np.float32)
        write_grey_tiff(tmp_path / f"{count}.tif", frames)
        with tifffile.TiffFile(tmp_path / f"{count}.tif") as tif:
            assert tif.pages.first.photometric == tifffile.PHOTOMETRIC.MINISBLACK
        np.testing.assert_array_equal(read_stack(tmp_path / f"{count}.tif"), frames)


def test_denoise_train_and_calibrate_refuse_an_rgb_tiff(rgb_tiff, tmp_path):
    model = tmp_path / "m.pt"
    save_denoiser(new_denoiser("n2v", 100.0, 10.0, features=8), model)
    says = (f"{rgb_tiff}: a colour image (RGB", "Split Channels", "[..., 0]")
    denoised = cli("denoise", rgb_tiff, "-m", model, "-o", tmp_path / "out.tif")
    assert_one_error_line(denoised, *says)
    assert not (tmp_path / "out.tif").exists()
    trained = cli("train", rgb_tiff, "-o", tmp_path / "t.pt", "--mode", "n2v", "--steps", "1")
    assert_one_error_line(trained, *says)
    assert not (tmp_path / "t.pt").exists()
    calibrated = cli("calibrate", rgb_tiff, "-o", tmp_path / "nm.pt")
    assert_one_error_line(calibrated, *says)
    assert not (tmp_path / "nm.pt").exists()


def test_folder_ingest_rejects_an_rgb_tiff_with_the_reason(rgb_tiff, tmp_path):
    watched, acquisition = tmp_path / "watched", tmp_path / "watched" / "cells"
    acquisition.mkdir(parents=True)
    log = tmp_path / "ingest.log"
    with log.open("w") as out:
        ingest = subprocess.Popen(
            [CLI, "ingest", "--data", tmp_path / "store", "--folder", watched,
             "--stable-seconds", "0.2"],
            stdout=out, stderr=out, env=ENV,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "ingesting into" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        (acquisition / "cells_rgb.tif").write_bytes(rgb_tiff.read_bytes())
        while "rejected" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        ingest.send_signal(signal.SIGTERM)
        ingest.wait(30)
    (line,) = [line for line in log.read_text().splitlines() if "rejected" in line]
    assert "cells_rgb.tif" in line and "holds 3 colour samples per pixel" in line
    assert "Split Channels" in line


def test_evaluate_with_mismatched_shapes_is_one_error_line(tmp_path):
    prediction = tmp_path / "pred.tif"
    write_grey_tiff(prediction, np.zeros((3, 64, 64), np.float32))  # as `denoise` writes it
    other_size = write_tiff(tmp_path / "gt_size.tif", np.zeros((48, 64), np.float32))
    other_count = write_tiff(
        tmp_path / "gt_count.tif", np.zeros((2, 64, 64), np.float32), photometric="minisblack"
    )
    assert_one_error_line(
        cli("evaluate", prediction, other_size),
        "do not match: prediction 3 frame(s) of 64x64, ground truth 1 frame(s) of 48x64",
    )
    assert_one_error_line(
        cli("evaluate", prediction, other_count),
        "prediction 3 frame(s) of 64x64, ground truth 2 frame(s) of 64x64",
        "one image for all frames or one per frame",
    )


def test_evaluate_on_16_bit_data_uses_and_prints_the_ground_truth_range(tmp_path):
    truth = np.tile(np.linspace(1000, 5000, 64), (64, 1)).astype(np.uint16)
    noisy = (truth + RNG.normal(0, 50, (2, 64, 64))).clip(0, 65535).astype(np.uint16)
    write_tiff(tmp_path / "gt.tif", truth)
    write_tiff(tmp_path / "pred.tif", noisy, photometric="minisblack")
    done = cli("evaluate", tmp_path / "pred.tif", tmp_path / "gt.tif")
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    assert scores["data_range"] == 4000.0
    assert "PSNR data range 4000 (ground truth max - min)" in done.stderr
    expected = np.mean([psnr(frame, truth, 4000.0) for frame in noisy])
    assert scores["psnr"] == pytest.approx(expected)
    assert scores["psnr_star"] == pytest.approx(
        np.mean([psnr_star(frame, truth, 4000.0) for frame in noisy])
    )
    fixed = cli("evaluate", tmp_path / "pred.tif", tmp_path / "gt.tif", "--data-range", "65535")
    assert json.loads(fixed.stdout)["data_range"] == 65535.0
    assert "PSNR data range 65535 (--data-range)" in fixed.stderr
    assert json.loads(fixed.stdout)["psnr"] == pytest.approx(
        np.mean([psnr(frame, truth, 65535.0) for frame in noisy])
    )
    write_tiff(tmp_path / "flat.tif", np.full((64, 64), 7, np.uint16))
    flat = cli("evaluate", tmp_path / "pred.tif", tmp_path / "flat.tif")
    assert_one_error_line(flat, "flat.tif is constant: give the PSNR range as --data-range R")


def test_ingest_on_a_data_path_that_cannot_be_written_is_one_error_line(tmp_path):
    (tmp_path / "file").write_text("")  # under a regular file nothing can be created, even as root
    done = cli("ingest", "--data", tmp_path / "file" / "store", "--zmq", "tcp://127.0.0.1:0")
    assert_one_error_line(done, f"--data {tmp_path / 'file' / 'store'}: cannot create or write it")
