"""The compute device, always visible: its description against torch's own facts, the warning for
an NVIDIA GPU this torch cannot use (probes pointed at a fake /proc-like folder, torch as it is),
the line every training/inference command prints, and a running daemon's start-up log, STATUS=,
/metrics and viewer status."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from serve_files import listeners, save_camera_noise_model

import pn2v_live
from pn2v_live.core.device import (
    CUDA_WHEELS,
    describe_device,
    gpu_advice,
    nvidia_gpu_evidence,
    resolve_device,
    torch_build,
    unusable_gpu_warning,
)
from pn2v_live.core.synthetic import Camera, acquisition
from pn2v_live.errors import UserError

CLI = Path(sys.executable).with_name("pn2v-live")
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
needs_unusable_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="torch can use a GPU here: nothing to warn about"
)


def expected_cpu_precision() -> str:
    """bfloat16 where oneDNN has native bf16 (AMX or AVX512-BF16), as torch reports it."""
    native = torch.backends.mkldnn.is_available() and (
        torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    )
    return "bfloat16" if native else "float32"


def fake_nvidia_proc(root: Path) -> Path:
    """A /proc-like folder holding driver/nvidia/version as a loaded NVIDIA driver writes it."""
    version = root / "proc" / "driver" / "nvidia" / "version"
    version.parent.mkdir(parents=True)
    version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15\n")
    return version


def test_cpu_description_and_torch_build_match_torch_facts():
    threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    assert describe_device(cpu) == (
        f"CPU, {threads} thread{'s' if threads != 1 else ''}, {expected_cpu_precision()}"
    )
    assert describe_device(cpu, bf16=False).endswith(", float32")
    assert describe_device(cpu, bf16=True).endswith(", bfloat16")
    build = torch_build()
    assert build.startswith(f"torch {torch.__version__}, ")
    if torch.version.cuda is None:
        assert build.endswith("CPU-only build") or "ROCm" in build
    else:
        assert build.endswith(f"CUDA {torch.version.cuda}")


def test_auto_is_cuda_exactly_when_torch_can_use_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto", probes=[], search_path="").type == expected
    if torch.cuda.is_available():
        description = describe_device(torch.device("cuda"))
        assert description == f"cuda:0 ({torch.cuda.get_device_name(0)}), bfloat16"


@needs_unusable_gpu
def test_auto_on_the_cpu_beside_an_nvidia_gpu_warns_how_to_fix_it(tmp_path, caplog):
    version = fake_nvidia_proc(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pn2v_live.device"):
        device = resolve_device("auto", probes=[version], search_path="")
    assert device == torch.device("cpu")
    (record,) = [r for r in caplog.records if r.name == "pn2v_live.device"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert f"an NVIDIA GPU is present ({version})" in message
    assert f"torch {torch.__version__}" in message
    if torch.version.cuda is None:  # a CPU-only wheel, as the plain `pip install` gives
        assert "CPU-only build" in message
        assert f"pip install torch --index-url {CUDA_WHEELS}" in message
    else:
        assert f"built for CUDA {torch.version.cuda}, cannot use it" in message


@needs_unusable_gpu
def test_nvidia_smi_on_path_counts_as_a_gpu_and_an_explicit_cuda_says_the_fix(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    assert nvidia_gpu_evidence([tmp_path / "absent"], str(bin_dir)) == str(smi)
    assert unusable_gpu_warning([tmp_path / "absent"], str(bin_dir)).startswith(
        f"an NVIDIA GPU is present ({smi})"
    )
    with pytest.raises(UserError) as refused:
        resolve_device("cuda", "--device", [tmp_path / "absent"], str(bin_dir))
    assert str(refused.value).startswith("--device cuda but no CUDA GPU is visible; an NVIDIA GPU")
    assert "pip install torch" in str(refused.value)


def test_no_gpu_on_the_machine_no_warning(tmp_path, caplog):
    empty = tmp_path / "proc"
    empty.mkdir()
    assert nvidia_gpu_evidence([empty / "driver" / "nvidia" / "version"], str(empty)) is None
    with caplog.at_level(logging.WARNING, logger="pn2v_live.device"):
        resolve_device("auto", probes=[empty / "driver" / "nvidia" / "version"], search_path="")
    assert not [r for r in caplog.records if r.name == "pn2v_live.device"]
    if not torch.cuda.is_available():
        refused = r"^inference.device = 'cuda' but no CUDA GPU.*\"cpu\"$"
        with pytest.raises(UserError, match=refused):
            resolve_device("cuda", "inference.device", [], "")


def test_advice_for_a_cuda_build_the_driver_cannot_run():
    advice = gpu_advice("/dev/nvidia0", "2.5.1+cu124", "12.4")
    assert "torch 2.5.1+cu124, built for CUDA 12.4, cannot use it" in advice
    assert "driver supports CUDA 12.4" in advice and "CUDA_VISIBLE_DEVICES" in advice
    assert "pip install torch --index-url https://download.pytorch.org/whl/cu118" in advice


def pn2v_live_cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    return done


def test_train_and_denoise_print_the_device_they_use(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.poisson(50, (3, 32, 32)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "raw.tif", frames, photometric="minisblack")
    expected = describe_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    line = f"on {expected}; {torch_build()}"
    trained = pn2v_live_cli("train", str(tmp_path / "raw.tif"), "-o", str(tmp_path / "m.pt"),
                            "--mode", "n2v", "--steps", "1", "--batch-size", "1",
                            "--patch-size", "32", "--context", "0:0")  # fmt: skip
    assert f"training {line}" in trained.stderr
    assert json.loads(trained.stdout.strip().splitlines()[-1])["device"] == expected
    denoised = pn2v_live_cli("denoise", str(tmp_path / "raw.tif"), "-m", str(tmp_path / "m.pt"),
                             "-o", str(tmp_path / "den.tif"), "--device", "cpu")  # fmt: skip
    cpu = describe_device(torch.device("cpu"))
    assert f"denoising on {cpu}; {torch_build()}" in denoised.stderr
    assert json.loads(denoised.stdout.strip().splitlines()[-1])["device"] == cpu


def test_calibrate_prints_where_it_runs(tmp_path):
    frames, _ = acquisition(Camera(gain=2.0, offset=100.0, read_noise=3.0), 10, (64, 64), seed=3)
    tifffile.imwrite(tmp_path / "pattern.tif", frames)
    done = pn2v_live_cli("calibrate", str(tmp_path / "pattern.tif"), "-o", str(tmp_path / "n.pt"),
                         "--kind", "histogram", "--bins", "16")  # fmt: skip
    cpu = f"CPU, {torch.get_num_threads()} threads"
    assert f"noise models fitted on {cpu}; {torch_build()}" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["device"] == cpu


def test_daemon_says_its_device_in_the_log_status_metrics_and_viewer(tmp_path):
    """A real `pn2v-live serve`: the start-up log line, systemd's STATUS=, the scraped
    pn2v_live_build_info and the viewer's /api/status all name the same device."""
    save_camera_noise_model(tmp_path / "nm.pt")
    metrics_port, viewer_port = free_port(), free_port()
    config = tmp_path / "pn2v-live.toml"
    config.write_text(
        f"""
[store]
root = "{tmp_path / "store"}"
[noise_model]
path = "nm.pt"
[ingest.zmq]
bind = ""
{listeners(metrics=f"127.0.0.1:{metrics_port}", viewer=f"127.0.0.1:{viewer_port}")}
[inference]
device = "cpu"
precision = "float32"
[trainer]
device = "cpu"
precision = "bfloat16"
"""
    )
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(1.0)
    env = {**ENV, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        daemon = subprocess.Popen(
            [CLI, "serve", "--config", config], stdout=out, stderr=out, env=env
        )
    try:
        ready = None
        deadline = time.monotonic() + 90
        while ready is None and time.monotonic() < deadline and daemon.poll() is None:
            try:
                message = notify.recv(65536).decode()
            except TimeoutError:
                continue
            if message.startswith("READY=1"):
                ready = message
        assert ready is not None, log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
        with urllib.request.urlopen(f"http://127.0.0.1:{viewer_port}/api/status", timeout=5) as r:
            status = json.loads(r.read())
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        notify.close()
    (sample,) = families["pn2v_live_build_info"].samples
    assert sample.name == "pn2v_live_build_info" and sample.value == 1
    labels = sample.labels
    assert labels["version"] == pn2v_live.__version__
    assert labels["torch"] == torch_build().removeprefix("torch ")
    assert labels["precision"] == "float32"  # inference.precision, not the native bfloat16
    assert labels["device"] == f"CPU, {ENV['OMP_NUM_THREADS']} threads"  # torch's threads there
    inference = f"{labels['device']}, float32"
    training = f"{labels['device']}, bfloat16"
    assert status["device"] == {
        "inference": inference,
        "training": training,
        "torch": torch_build(),
        "warning": None,  # devices chosen, not "auto"
    }
    assert ready.rstrip().endswith(f"; inference on {inference}")
    assert f"inference on {inference}; training on {training}; {torch_build()}" in log.read_text()


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_cpu_threads_wait_passively_unless_the_user_says_otherwise(given, expected):
    """pn2v_live sets OpenMP's wait policy before torch loads (torch reads it when it starts its
    threads); a value in the environment is kept."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import pn2v_live, os, sys; import torch; print(os.environ['OMP_WAIT_POLICY'])"
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    assert shown == expected
