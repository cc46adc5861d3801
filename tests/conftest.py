"""Shared fixtures: the real microscope data folder, and a CPU-friendly torch setup."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest
import torch

from pn2v_live.service.native_memory import malloc_trim

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


def _ephemeral_ports_start() -> int:
    """First port of the kernel's ephemeral range (bind(0) and outgoing connections use it)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


_HANDED_OUT: set[int] = set()
_RANDOM = random.SystemRandom()


def free_port(pairs: bool = False) -> int:
    """A TCP port on 127.0.0.1 that is free now, for a process started later that must keep it
    across restarts (with `pairs`, port + 1 too, for the status socket).

    Drawn below the ephemeral range, so no outgoing connection or bind(0) elsewhere takes it
    before the process binds it, and never handed out twice in one test run.
    """
    end = _ephemeral_ports_start()
    start = max(1024, end - 12000)
    while True:
        port = _RANDOM.randrange(start, end - 1)
        wanted = {port, port + 1} if pairs else {port}
        if not wanted & _HANDED_OUT and all(_bindable(p) for p in wanted):
            _HANDED_OUT.update(wanted)
            return port


GLIBC_ONLY = pytest.mark.skipif(malloc_trim() is None, reason="glibc only")
HEAP_BYTES = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit systems


def thread_heaps(pid: int) -> int:
    """How many malloc heaps besides the main one glibc has made in process `pid`, from its
    /proc/PID/maps: each is an anonymous mapping of HEAP_BYTES aligned to HEAP_BYTES, readable
    and writable as far as it has grown and inaccessible ("---p") beyond."""
    regions = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(address, 16) for address in fields[0].split("-"))
        regions.append((start, end, fields[1], len(fields) > 5))
    heaps = 0
    for i, (start, end, permissions, named) in enumerate(regions):
        if start % HEAP_BYTES or named or permissions != "rw-p":
            continue
        after = regions[i + 1] if i + 1 < len(regions) else None
        if after and after[0] == end and after[2] == "---p" and not after[3]:
            end = after[1]
        heaps += end - start == HEAP_BYTES
    return heaps
