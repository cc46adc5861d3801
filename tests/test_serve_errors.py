"""`pn2v-live serve` refuses to start on a bad setup with one clear line and a non-zero exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from pn2v_live.core.device import resolve_device
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.errors import UserError
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.store import Store

CLI = Path(sys.executable).with_name("pn2v-live")
SOCKETS_OFF = {
    "ingest.zmq.bind": '""',
    "metrics.bind": '""',
    "viewer.bind": '""',
    "publish.bind": '""',
}


def serve(
    tmp_path: Path, settings: dict[str, str], noise_model: bool = True
) -> subprocess.CompletedProcess:
    """Run `serve` with a config built from dotted `settings` (TOML values); it must exit."""
    if noise_model:
        model = PoissonGaussianNoiseModel(
            gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 255)
        )
        save_noise_model(model, tmp_path / "nm.pt")
    defaults = {"store.root": f'"{tmp_path / "store"}"', **SOCKETS_OFF}
    lines = ['noise_model.path = "nm.pt"']
    lines += [f"{key} = {value}" for key, value in {**defaults, **settings}.items()]
    config = tmp_path / "serve.toml"
    config.write_text("\n".join(lines) + "\n")
    return subprocess.run(
        [CLI, "serve", "--config", config], capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def test_bad_config_value(tmp_path):
    result = serve(tmp_path, {"trainer.steps_per_round": "-5"})
    assert_one_line_error(result, "trainer.steps_per_round", "greater than 0")
    assert not (tmp_path / "store").exists()  # refused before touching anything


def test_unknown_config_key(tmp_path):
    result = serve(tmp_path, {"trainer.stepz": "5"})
    assert_one_line_error(result, "trainer.stepz", "unknown key")


def test_bad_override_flag(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text("")
    result = subprocess.run(
        [CLI, "serve", "--config", config, "--set", "inference.max_in_flight=many"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, "inference.max_in_flight", "valid integer")


def test_missing_noise_model(tmp_path):
    result = serve(tmp_path, {}, noise_model=False)
    assert_one_line_error(result, "nm.pt", "pn2v-live calibrate")


def test_corrupt_noise_model(tmp_path):
    (tmp_path / "nm.pt").write_bytes(b"this is not a noise model")
    result = subprocess.run(
        [
            CLI,
            "serve",
            "--set",
            f'store.root="{tmp_path / "store"}"',
            "--set",
            f'noise_model.path="{tmp_path / "nm.pt"}"',
        ]
        + [arg for key, value in SOCKETS_OFF.items() for arg in ("--set", f"{key}={value}")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(result, "nm.pt", "noise-model")


def test_unreachable_dask_scheduler(tmp_path):
    result = serve(tmp_path, {"inference.scheduler": f'"tcp://127.0.0.1:{free_port()}"'})
    assert_one_line_error(result, "inference.scheduler", "no dask scheduler answers")


@pytest.mark.parametrize(
    ("key", "template"),
    [
        ("metrics.bind", '"127.0.0.1:{port}"'),
        ("viewer.bind", '"127.0.0.1:{port}"'),
        ("ingest.zmq.bind", '"tcp://127.0.0.1:{port}"'),
        ("publish.bind", '"tcp://127.0.0.1:{port}"'),
    ],
)
def test_port_in_use(tmp_path, key, template):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, {key: template.format(port=port)})
    assert_one_line_error(result, str(port))


def test_missing_initial_model(tmp_path):
    result = serve(tmp_path, {"model.initial": '"start.pt"'})
    assert_one_line_error(result, "start.pt", "not found")


def test_store_root_already_written_by_another_process(tmp_path):
    holder = Store(tmp_path / "store", writer=True)
    result = serve(tmp_path, {})
    holder.close()
    assert_one_line_error(result, str(tmp_path / "store"), f"pid {os.getpid()}", "stop it first")


@pytest.mark.parametrize("where", ["parent is a file", "models is a file"])
def test_store_root_that_cannot_be_written(tmp_path, where):
    # Under a regular file nothing can be created, even as root (chmod would not stop root).
    if where == "parent is a file":
        (tmp_path / "file").write_text("")
        root = tmp_path / "file" / "store"
    else:
        root = tmp_path / "store"
        root.mkdir()
        (root / "models").write_text("")  # the model registry's folder
    result = serve(tmp_path, {"store.root": f'"{root}"'})
    assert_one_line_error(result, f"store.root {root}: cannot create or write it")


@pytest.mark.parametrize(
    "setting",
    [
        {"inference.device": f'"cuda:{torch.cuda.device_count()}"'},  # one past the last GPU
        pytest.param(
            {"trainer.device": '"mps"'},
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is here"),
        ),
    ],
    ids=["cuda-past-the-last-gpu", "mps"],
)
def test_device_that_is_not_there(tmp_path, setting):
    (key,) = setting
    result = serve(tmp_path, setting)
    assert_one_line_error(result, key, setting[key].strip('"'))


def test_gpu_number_beyond_the_visible_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1", "trainer.device") == torch.device("cuda:1")
    with pytest.raises(UserError, match=r"trainer.device = 'cuda:3' but only 2 CUDA GPU"):
        resolve_device("cuda:3", "trainer.device")
