"""Shared fixtures: the real microscope data folder, and a CPU-friendly torch setup."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ON_CI = os.environ.get("CI", "").lower() == "true"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require(condition: bool, why: str) -> None:
    """Skip when a prerequisite is missing; under CI=true fail instead, never skip."""
    if condition:
        return
    if ON_CI:
        pytest.fail(f"missing under CI: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder (PN2V_LIVE_TEST_DATA, default ../shared/data)."""
    path = Path(os.environ.get("PN2V_LIVE_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    require(path.is_dir(), f"test data folder {path} not found (set PN2V_LIVE_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Folder for files a person should look at after the run (screenshots, reports)."""
    path = PROJECT_ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def free_port(pairs: bool = False) -> int:
    """A free TCP port on 127.0.0.1 (with `pairs`, port + 1 is free too, for the status socket)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not pairs:
            return port
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
