"""The daemon's malloc trimming (`service.native_memory`): freed heap memory leaves RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from pn2v_live.service import native_memory
from pn2v_live.service.native_memory import Trimmer

# In a fresh interpreter: 100 MiB of 2 MiB blocks taken from the heap (a 4 MiB block freed
# first raises glibc's mmap threshold, as torch's first tensors do), written, and all but the
# last freed; RSS (MiB) then, and after the Trimmer has run.
PROBE = """
import ctypes, json, os, time
from pn2v_live.service.native_memory import Trimmer

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20

libc.free(libc.malloc(4 << 20))
blocks = [libc.malloc(2 << 20) for _ in range(51)]
for block in blocks:
    ctypes.memset(block, 1, 2 << 20)
for block in blocks[:-1]:
    libc.free(block)
freed = rss()
trimmer = Trimmer(every_s=0.05)
started = trimmer.start()
time.sleep(0.5)
trimmer.stop()
print(json.dumps({"started": started, "freed": freed, "trimmed": rss(), "trims": trimmer.trims}))
"""


@pytest.mark.skipif(native_memory.malloc_trim() is None, reason="glibc only (malloc_trim)")
def test_freed_heap_memory_leaves_resident_memory():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["started"] and result["trims"] >= 3
    # the 100 MiB freed stayed resident until trimmed
    assert result["freed"] - result["trimmed"] >= 90, result


def test_trims_until_stopped():
    calls = threading.Semaphore(0)
    trimmer = Trimmer(every_s=0.01, trim=lambda: calls.release() or 1)
    assert trimmer.start()
    for _ in range(3):
        assert calls.acquire(timeout=5)
    trimmer.stop()
    trimmer.join(timeout=5)
    assert not trimmer.is_alive() and trimmer.trims >= 3


def test_no_thread_without_malloc_trim(monkeypatch):
    monkeypatch.setattr(native_memory, "malloc_trim", lambda: None)
    trimmer = Trimmer()
    assert not trimmer.start()
    assert not trimmer.is_alive()
