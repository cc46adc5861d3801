"""What a test's `pn2v-live` process starts from: a noise model file, config sections, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pn2v_live.core.noise.poisson_gaussian import PoissonGaussianNoiseModel
from pn2v_live.storage.noise_model_file import save_noise_model

CLI = [sys.executable, "-m", "pn2v_live"]

# Trainer and inference on the CPU, eager; no model is ever trained (too many frames needed).
CPU_WITHOUT_TRAINING = """
[trainer]
device = "cpu"
first_model_frames = 1000000
[inference]
device = "cpu"
compile = false
"""


def listeners(metrics: str = "", viewer: str = "", publish: str = "") -> str:
    """The [metrics], [viewer] and [publish] sections binding these addresses ("": not at all)."""
    return f"""
[metrics]
bind = "{metrics}"
[viewer]
bind = "{viewer}"
[publish]
bind = "{publish}"
"""


def save_camera_noise_model(path: Path, white: float = 255.0) -> Path:
    """Save a Poisson–Gaussian noise model (gain 1, offset 0, read noise 2 ADU) of signals in
    [0, `white`] ADU at `path`."""
    model = PoissonGaussianNoiseModel(
        gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0.0, white)
    )
    save_noise_model(model, path)
    return path


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """`pn2v-live ARGS` in a subprocess, its output captured as text; with `check`, asserting
    that it exits 0."""
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done
