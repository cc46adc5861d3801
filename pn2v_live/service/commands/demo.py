"""`pn2v-live demo`: the whole product on one machine, without a microscope, GPU or data.

1. a simulated camera images a static test pattern; its noise model is calibrated from it
   (`--camera scmos`: an sCMOS sensor with per-pixel maps, calibrated from dark and flat series);
2. the daemon starts (in this process) on a temporary store, with small CPU-friendly settings;
3. `pn2v-live simulate` (a separate process, like a microscope) plays a noisy acquisition of
   a slowly drifting synthetic sample over ZeroMQ, or `--data STACK`;
4. the trainer fine-tunes PN2V on the arriving frames and inference denoises each one;
5. once a trained model denoises newly arriving frames, it prints "denoising live" (with PSNR
   against the clean scene for synthetic data) and keeps serving the viewer until Ctrl-C.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from pn2v_live.core.metrics import psnr
from pn2v_live.core.synthetic_scmos import ScmosCamera
from pn2v_live.errors import UserError
from pn2v_live.service.cli import app
from pn2v_live.service.commands.demo_scmos import calibrate_scmos, fixed_pattern, scmos_camera
from pn2v_live.service.commands.options import panel_option
from pn2v_live.service.viewer import acquisition_summary
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.summary import of_acquisition

ACQUISITION = "demo"
DEMO_CAMERA_SEED = 7
PROGRESS_SECONDS = 15.0
own_data = panel_option("Your own data instead of the simulated sample")


@dataclass(frozen=True)
class Recording:
    """What the simulated microscope plays: noisy frames (T, Y, X), and the clean scene per
    frame when it is known (synthetic data), for PSNR."""

    frames: np.ndarray
    clean: np.ndarray | None
    offset_map: np.ndarray | None = None  # an sCMOS camera's true offsets (Y, X), ADU


class CameraKind(StrEnum):
    simple = "simple"  # one noise model for every pixel
    scmos = "scmos"  # per-pixel offset, gain and read-noise maps, hot pixels


def drifting_sample(frames: int, size: int, seed: int = 0, scmos: ScmosCamera | None = None):
    """A dim synthetic sample drifting one pixel every four frames, seen by a noisy camera (the
    demo's, or the sCMOS camera `scmos`); a `Recording`.

    Dim on purpose (peak ≈ 60 photoelectrons) so that the noise is obvious, as in live-cell
    imaging at low light.
    """
    from pn2v_live.core import synthetic

    camera = scmos or synthetic.Camera()
    offset, gain = scmos.maps.reference if scmos else (camera.offset, camera.gain)
    rng = np.random.default_rng(seed)
    drift = frames // 4 + 1
    scene = synthetic.scene((size, size + drift), rng, offset + 4 * gain, offset + 60 * gain)
    clean = np.stack([scene[:, t // 4 : t // 4 + size] for t in range(frames)])
    offsets = scmos.maps.offset if scmos else None
    return Recording(np.stack([camera.expose(c, rng) for c in clean]), clean, offsets)


def test_pattern(frames: int, size: int) -> np.ndarray:
    """Calibration acquisition: `frames` noisy frames (T, Y, X) of a static synthetic pattern
    spanning the camera's range, by the same simulated camera as `drifting_sample`."""
    from pn2v_live.core import synthetic

    camera = synthetic.Camera()
    peak = camera.offset + 120 * camera.gain
    return synthetic.acquisition(
        camera, frames, (size, size), background=camera.offset, peak=peak, seed=DEMO_CAMERA_SEED
    )[0]


def read_frames(path: Path, option: str, size: int | None = None) -> np.ndarray:
    """The stack (T, Y, X) at `path` (at least 2 frames), centre-cropped to `size`² if given."""
    from pn2v_live.storage.images import read_stack

    stack = read_stack(path)  # UserError naming the file when it is unreadable
    if len(stack) < 2:
        raise UserError(f"{option} {path}: need a stack of at least 2 frames, found {len(stack)}")
    if size is None:
        return stack
    height, width = stack.shape[1:]
    top, left = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return stack[:, top : top + size, left : left + size]


def calibrate(path: Path, source: Path | None, size: int) -> None:
    """Calibrate the noise model saved at `path` from `source`, a static-scene stack (whole
    frames), or without one from a simulated test pattern seen by the demo's camera."""
    from pn2v_live.calibration.workflow import calibrate_stack

    if source is None:
        print(f"calibrating the noise model from a simulated test pattern {size}x{size}")
        frames = test_pattern(50, size)
    else:
        print(f"calibrating the noise model from {source}")
        frames = read_frames(source, "--calibration")
    result = calibrate_stack(frames, path, "demo camera")
    print(
        f"noise model: {result.chosen}, Poisson–Gaussian fit gain {result.summary['gain']:.3g} "
        f"ADU/e-, read noise {result.summary['read_noise']:.3g} ADU",
    )


def demo_config(
    work: Path,
    noise_model: Path,
    viewer: str,
    metrics: str,
    steps: int,
    k: int,
    every: int,
    token: str = "",
):
    """Daemon settings for a small CPU: every key as `pn2v-live serve --set` would take it;
    `token` guards the viewer and metrics (needed where they bind beyond loopback).

    The ZeroMQ sockets bind on ports the system picks (`*`) when the daemon starts, so two
    demos, or a demo beside a daemon, never race for a port; `Daemon.addresses` has them.
    """
    from pn2v_live.service.config import load_config

    return load_config(
        None,
        [
            f'store.root="{work / "store"}"',
            f'noise_model.path="{noise_model.resolve()}"',
            'ingest.zmq.bind="tcp://127.0.0.1:*"',
            'publish.bind="tcp://127.0.0.1:*"',
            f'viewer.bind="{viewer}"',
            f'metrics.bind="{metrics}"',
            f'viewer.token="{token}"',
            f'metrics.token="{token}"',
            f"trainer.every_frames={every}",
            "trainer.every_seconds=15",
            f"trainer.steps_per_round={steps}",
            "trainer.patch_size=64",
            "trainer.batch_size=8",
            f"trainer.k={k}",
            "trainer.learning_rate=0.001",
        ],
    )


def listener_token(*binds: str) -> str:
    """A fresh random token when any of `binds` (host:port, "" for off) listens beyond
    loopback, where the daemon requires one; "" otherwise."""
    from pn2v_live.service.access import is_loopback, split_host_port

    parsed = [split_host_port(bind) for bind in binds if bind]
    if all(p is None or is_loopback(p[0]) for p in parsed):
        return ""
    return secrets.token_urlsafe(24)


class Watcher(threading.Thread):
    """Prints progress from the daemon's status and the store, and the "denoising live" line."""

    def __init__(self, server, recording: Recording, exit_when_live: bool):
        super().__init__(name="demo-watcher", daemon=True)
        self.server, self.recording, self.exit_when_live = server, recording, exit_when_live
        self.started = time.monotonic()
        self.stopping = threading.Event()

    def run(self) -> None:
        printed_state, printed_at, first_model_at = None, 0.0, None
        while not self.stopping.wait(1.0):
            if ACQUISITION not in self.server.store.acquisitions():
                continue
            acquisition = self.server.store.acquisition(ACQUISITION)
            status = self.server.status()
            version = status["model_version"]
            if version is not None and first_model_at is None:
                first_model_at = acquisition.valid_t
            # A line when a round ends or the model changes, else every PROGRESS_SECONDS.
            state = (status["training_rounds"], version)
            if state != printed_state or time.monotonic() - printed_at > PROGRESS_SECONDS:
                print(self.progress_line(status, acquisition))
                printed_state, printed_at = state, time.monotonic()
            if first_model_at is None:
                if acquisition.closed:
                    print("the acquisition ended before the first model was trained: give more "
                          "--frames to see live denoising")  # fmt: skip
                    return
                continue
            newer = [
                t
                for t in range(first_model_at, acquisition.valid_t)
                if acquisition.denoised_version(t) == version
            ]
            if newer:
                self.announce_live(acquisition, newer[-1], version)
                return

    def progress_line(self, status: dict, acquisition: Acquisition) -> str:
        summary = acquisition_summary(of_acquisition(acquisition))
        model = f"model v{status['model_version']}" if status["model_version"] else "no model yet"
        loss = ""
        if status["loss_history"]:
            loss = f", validation loss {status['loss_history'][-1]['validation_loss']:.3f}"
        return (
            f"[{time.monotonic() - self.started:5.0f} s] {summary['frames']} frames stored, "
            f"{summary['denoised']} denoised; {status['training_rounds']} training round(s)"
            f"{loss}; {model}"
        )

    def announce_live(self, acquisition: Acquisition, t: int, version: int) -> None:
        message = f"denoising live: frame {t} denoised by PN2V model v{version}"
        if self.recording.clean is not None:
            clean = self.recording.clean[t]
            data_range = float(clean.max() - clean.min())
            raw = psnr(acquisition.read_raw(t).astype(np.float32), clean, data_range)
            denoised = psnr(acquisition.read_denoised(t), clean, data_range)
            message += f"; PSNR vs the clean sample: raw {raw:.1f} dB, denoised {denoised:.1f} dB"
        if self.recording.offset_map is not None:
            raw_frame, offset_map = acquisition.read_raw(t), self.recording.offset_map
            message += f"; {fixed_pattern(acquisition.read_denoised(t), raw_frame, offset_map)}"
        print(message)
        if self.exit_when_live:
            self.server.request_stop()


def start_microscope(
    stack_path: Path, addresses: dict[str, str], frames: int, fps: float, log_path: Path
):
    """`pn2v-live simulate` in its own process (and session: Ctrl-C reaches only the demo),
    sending to the daemon's frame socket and asking its status socket (`Daemon.addresses`)."""
    entry = "from pn2v_live.service.cli import main; main()"
    command = [sys.executable, "-P", "-c", entry, "simulate", "--to", addresses["frames"]]
    command += ["--status", addresses["frames_status"]]
    command += ["--source", str(stack_path), "--frames", str(frames), "--fps", str(fps)]
    command += ["--acquisition", ACQUISITION]
    with log_path.open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)


@app.command()
def demo(
    data: Annotated[Path | None, own_data("noisy stack to play (TIFF/PNG/folder)")] = None,
    calibration: Annotated[
        Path | None,
        own_data("static-scene stack to calibrate from", show_default="--data itself"),
    ] = None,
    noise_model: Annotated[
        Path | None,
        own_data("use this noise-model file (pn2v-live calibrate) instead of calibrating"),
    ] = None,
    camera: Annotated[
        CameraKind,
        typer.Option(help="simulated camera: simple, or scmos (per-pixel maps, hot pixels)"),
    ] = CameraKind.simple,
    frames: Annotated[int, typer.Option(help="frames the simulated microscope plays", min=8)] = 600,
    fps: Annotated[float, typer.Option(help="frames per second", min=0.1)] = 2.0,
    size: Annotated[int, typer.Option(help="frame side in pixels (crops --data)", min=64)] = 128,
    steps: Annotated[int, typer.Option(help="training steps per round", min=1)] = 100,
    k: Annotated[int, typer.Option(help="PN2V prior samples per pixel", min=2)] = 64,
    every: Annotated[int, typer.Option(help="train after this many new frames", min=1)] = 16,
    viewer: Annotated[str, typer.Option(help="viewer host:port (port 0: any free)")] = (
        "127.0.0.1:8080"
    ),
    metrics: Annotated[str, typer.Option(help="metrics host:port (port 0: any free)")] = (
        "127.0.0.1:9464"
    ),
    workdir: Annotated[
        Path | None,
        typer.Option(help="keep the store, models and logs here", show_default="temporary"),
    ] = None,
    exit_when_live: Annotated[
        bool, typer.Option(help="stop once denoising is live (for scripted checks)")
    ] = False,
    verbose: Annotated[bool, typer.Option(help="show the daemon's log lines")] = False,
) -> None:
    """Simulated microscope → ingest → calibrate → train → live denoising, with the viewer."""
    from pn2v_live.service.daemon import Daemon
    from pn2v_live.storage.images import write_tiff

    if calibration is not None and (data is None or noise_model is not None):
        raise UserError("--calibration goes with --data, and not with --noise-model")
    if camera is CameraKind.scmos and (data is not None or noise_model is not None):
        raise UserError("--camera scmos simulates its own camera: not with --data or --noise-model")
    if not verbose:
        logging.getLogger("pn2v_live").setLevel(logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear at once, even in pipes
    with ExitStack() as cleanup:
        if workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="pn2v-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"pn2v-live demo in {workdir}")

        scmos = scmos_camera(size, DEMO_CAMERA_SEED) if camera is CameraKind.scmos else None
        if data is None:
            recording = drifting_sample(frames, size, scmos=scmos)
        else:
            stack = read_frames(data, "--data", size)
            recording = Recording(stack[np.arange(frames) % len(stack)], None)
        if scmos is not None:
            noise_model = workdir / "noise-model.pt"
            calibrate_scmos(noise_model, scmos)
        if noise_model is None:
            noise_model = workdir / "noise-model.pt"
            calibrate(noise_model, calibration or data, size)

        stack_path = workdir / "acquisition.tif"
        write_tiff(stack_path, recording.frames)
        token = listener_token(viewer, metrics)
        config = demo_config(workdir, noise_model, viewer, metrics, steps, k, every, token)
        daemon = Daemon(config)
        daemon.start()
        cleanup.callback(daemon.close)
        devices = daemon.devices
        print(
            f"inference on {devices['inference']}; training on {devices['training']}; "
            f"{devices['torch']}"
        )
        viewer_url = daemon.addresses.get("viewer", "off")  # off: --viewer ""
        print(f"viewer:  {viewer_url}" + (f"?token={token}" if token and viewer else ""))
        print(f"metrics: {daemon.addresses.get('metrics', 'off')}")
        if token:
            print(f"access token (Authorization: Bearer): {token}")
        print(f"denoised frames published on {daemon.addresses['publish']} (ZeroMQ PUB)")
        print(
            f"frames received on {daemon.addresses['frames']} "
            f"(status {daemon.addresses['frames_status']})"
        )

        microscope = start_microscope(
            stack_path, daemon.addresses, frames, fps, workdir / "microscope.log"
        )
        cleanup.callback(stop_process, microscope)
        print(f"microscope playing {frames} frames at {fps:g} frames/s; Ctrl-C stops")
        watcher = Watcher(daemon, recording, exit_when_live)
        watcher.start()
        cleanup.callback(watcher.stopping.set)
        daemon.run()  # until Ctrl-C / SIGTERM, or request_stop once live with --exit-when-live
        print("stopped")


def stop_process(process: subprocess.Popen) -> None:
    """Terminate `process` (SIGTERM, then SIGKILL after 5 s) if it is still running."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
