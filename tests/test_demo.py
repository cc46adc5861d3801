"""`pn2v-live demo` end to end in a real process: calibrate, serve, stream, train, denoise live."""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq
from conftest import thread_heaps
from PIL import Image

from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.store import Store
from pn2v_live.wire.protocol import decode_message
from pn2v_live.wire.sender import FrameSender

pytestmark = pytest.mark.slow

LIVE = re.compile(r"denoising live: .*raw ([\d.]+) dB, denoised ([\d.]+) dB")


def read_lines(process: subprocess.Popen, lines: list[str]) -> None:
    for line in process.stdout:
        lines.append(line.rstrip("\n"))


def wait_for_line(lines: list[str], pattern: str, process, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if match := re.search(pattern, line):
                return match
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(lines))


def test_demo_reaches_denoising_live_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, artifacts_dir: Path
) -> None:
    # Tiny budget: 64² frames, short rounds, K = 16; still real PN2V through the real daemon.
    command = [sys.executable, "-c", "from pn2v_live.service.cli import main; main()", "demo"]
    command += ["--size", "64", "--frames", "2000", "--fps", "4", "--steps", "40", "--k", "16"]
    command += ["--viewer", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    command += ["--workdir", str(tmp_path / "demo")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=read_lines, args=(process, lines), daemon=True).start()
    try:
        viewer = wait_for_line(lines, r"viewer: +(http://\S+)", process, 120)[1]
        metrics = wait_for_line(lines, r"metrics: +(http://\S+)", process, 10)[1]
        publish = wait_for_line(lines, r"published on (tcp://\S+)", process, 10)[1]
        frames_at, status_at = wait_for_line(
            lines, r"frames received on (tcp://\S+) \(status (tcp://\S+)\)", process, 10
        ).groups()
        live = wait_for_line(lines, LIVE.pattern, process, 300)
        raw_db, denoised_db = float(live[1]), float(live[2])
        assert denoised_db > raw_db + 3, "denoised frames must be clearly cleaner than raw"

        [summary] = json.load(urllib.request.urlopen(f"{viewer}api/acquisitions", timeout=10))
        assert summary["name"] == "demo" and summary["frames"] > 0 and summary["denoised"] > 0
        # What the viewer shows for the live frame, side by side for a person to look at.
        t = int(re.search(r"frame (\d+)", live[0])[1])
        panels = [
            Image.open(io.BytesIO(urllib.request.urlopen(
                f"{viewer}api/acquisitions/demo/{kind}/{t}?lo=100&hi=230", timeout=10).read()))
            for kind in ("raw", "denoised")
        ]  # fmt: skip
        side_by_side = Image.new("L", (2 * panels[0].width + 4, panels[0].height))
        for i, panel in enumerate(panels):
            side_by_side.paste(panel, (i * (panel.width + 4), 0))
        side_by_side.resize((4 * side_by_side.width, 4 * side_by_side.height)).save(
            artifacts_dir / "demo_raw_vs_denoised.png"
        )
        roughness = [np.abs(np.diff(np.asarray(p, float), axis=1)).mean() for p in panels]
        assert roughness[1] < roughness[0] / 2, "the denoised rendering must be visibly smoother"
        exposition = urllib.request.urlopen(metrics, timeout=10).read().decode()
        assert re.search(r"^pn2v_live_model_version [1-9]", exposition, re.M)
        assert thread_heaps(process.pid) == 0  # every thread of the demo shares one heap

        # The daemon's PUB socket streams the denoised frames as they are written.
        subscriber = zmq.Context.instance().socket(zmq.SUB)
        subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        subscriber.connect(publish)
        assert subscriber.poll(30_000), "no denoised frame published within 30 s"
        message = decode_message(subscriber.recv_multipart())
        subscriber.close()
        assert message.acquisition == "demo" and message.pixels.dtype == np.float32
        assert message.pixels.shape == (64, 64) and 0 <= message.index < 2000

        # The printed frame and status sockets are the ones the microscope really uses.
        with FrameSender(frames_at, status_at) as sender:
            reply = sender.status("demo", timeout=10)
        assert reply is not None and reply["known"] and reply["stored"][0][0] == 0

        process.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert process.wait(60) == 0
    finally:
        process.kill()
    wait_for_line(lines, r"^stopped$", process, 5)
    microscope_log = (tmp_path / "demo" / "microscope.log").read_text()
    assert "Traceback" not in microscope_log


def test_demo_with_a_real_stack(tmp_path: Path, data_dir: Path) -> None:
    stack = data_dir / "fmd_confocal_bpae" / "fov03" / "raw.tif"
    # The camera's noise model from another field of view (a facility's existing calibration).
    fov01 = tifffile.imread(data_dir / "fmd_confocal_bpae" / "fov01" / "raw.tif")
    noise_model = tmp_path / "fov01-noise-model.pt"
    signal = np.broadcast_to(fov01.mean(0), fov01.shape)
    save_noise_model(PoissonGaussianNoiseModel.fit(signal, fov01), noise_model)
    command = [sys.executable, "-c", "from pn2v_live.service.cli import main; main()", "demo"]
    command += ["--data", str(stack), "--noise-model", str(noise_model), "--size", "64"]
    command += ["--frames", "2000", "--fps", "4", "--steps", "40", "--k", "16"]
    command += ["--viewer", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    command += ["--workdir", str(tmp_path / "demo"), "--exit-when-live"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "calibrating" not in result.stdout
    assert re.search(
        r"^denoising live: frame \d+ denoised by PN2V model v\d+$", result.stdout, re.M
    )
    store = Store(tmp_path / "demo" / "store")
    acquisition = store.acquisition("demo")
    frames = tifffile.imread(stack)[:, 224:288, 224:288]  # the demo's centre crop of 512²
    for t in range(min(acquisition.valid_t, 60)):
        np.testing.assert_array_equal(acquisition.read_raw(t), frames[t % len(frames)])
    store.close()


def test_demo_beyond_loopback_makes_the_token_the_daemon_requires(tmp_path: Path) -> None:
    from pn2v_live.errors import UserError
    from pn2v_live.service.commands.demo import demo_config, listener_token

    assert listener_token("127.0.0.1:8080", "[::1]:9464") == ""
    assert listener_token("127.0.0.1:8080", "") == ""
    token = listener_token("0.0.0.0:8080", "127.0.0.1:9464")
    assert len(token) >= 24 and token != listener_token("0.0.0.0:8080", "")
    settings = ("0.0.0.0:0", "127.0.0.1:0", 10, 16, 8)
    config = demo_config(tmp_path, tmp_path / "nm.pt", *settings[:2], *settings[2:], token)
    assert config.viewer.token == token and config.metrics.token == token
    with pytest.raises(UserError, match="viewer.token"):
        demo_config(tmp_path, tmp_path / "nm.pt", *settings)  # what the demo did before
