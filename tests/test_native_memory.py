"""The daemon's native memory (`service.native_memory`): one malloc heap for all threads, and
freed heap memory leaves RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from conftest import GLIBC_ONLY, thread_heaps

from pn2v_live.service import native_memory
from pn2v_live.service.native_memory import Trimmer

# In a fresh interpreter (argv: "one" to call `one_heap` first, and a file): four threads alive
# at once each allocate 1 MiB, then glibc's own report (malloc_info) goes to the file; the
# process waits for its stdin to close.
HEAPS = """
import ctypes, sys, threading
from pn2v_live.service.native_memory import one_heap

print(one_heap() if sys.argv[1] == "one" else None)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
together = threading.Barrier(4)
blocks = []

def allocate():
    blocks.append(libc.malloc(1 << 20))
    together.wait()  # no thread ends (and hands its heap on) before all have allocated

threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
assert all(blocks)
report = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, report)
libc.fclose(report)
print("reported", flush=True)
sys.stdin.read()
"""


@GLIBC_ONLY
@pytest.mark.parametrize("one", [True, False])
def test_one_heap_for_threads_started_after_it(tmp_path, one):
    report = tmp_path / "malloc_info.xml"
    mode = "one" if one else "default"
    command = [sys.executable, "-c", HEAPS, mode, str(report)]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    with subprocess.Popen(command, **pipes) as probe:
        set_ = probe.stdout.readline().strip()
        assert probe.stdout.readline().strip() == "reported"
        seen_in_maps = thread_heaps(probe.pid)
        probe.stdin.close()
        assert probe.wait(timeout=30) == 0
    heaps = report.read_text().count("<heap nr=")
    assert seen_in_maps == heaps - 1  # the tests' count from /proc agrees with glibc's own
    if one:
        assert set_ == "True" and heaps == 1
    else:  # glibc's default: a heap per thread (up to 8 per core), the main thread's included
        assert heaps >= 3


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


@GLIBC_ONLY
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
