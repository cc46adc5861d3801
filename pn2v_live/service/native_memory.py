"""The daemon's native memory: one malloc heap for all its threads, and what torch frees goes
back to the system every few seconds.

glibc serves a request of at least its mmap threshold with a mapping of its own; smaller ones
come from a heap ("arena"), by default one per thread (up to 8 per core). The threshold rises to
the size of every such block freed (up to 32 MiB on 64-bit systems), so torch's buffers of 1–32
MiB (activations, the MMSE's chunks of K samples, batches and gradients) come from the heaps,
and what they leave free there stays resident.

`one_heap` makes threads that allocate for the first time after it share the main heap
(`mallopt` M_ARENA_MAX = 1, as MALLOC_ARENA_MAX=1 would), so memory one thread frees serves the
next request of any other instead of staying resident in a heap of its own. The price, one
malloc lock for every thread, does not show: training and inference compute in turns on one
thread (`pipeline.compute_turns`), and the other threads allocate little.

`Trimmer` calls `malloc_trim(0)` every TRIM_SECONDS, which hands the free pages of the heaps
back (madvise), so they cannot pile up behind the heaps' high-water marks for longer than that.
A fixed mmap threshold instead (MALLOC_MMAP_THRESHOLD_) would make every large buffer a fresh
zero-filled mapping, and training and inference slower (docs/soak.md).

On another C library there is nothing to do (`one_heap` and `Trimmer.start` return False).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_SECONDS = 10.0  # free arena pages go back to the system this often
M_ARENA_MAX = -8  # mallopt's parameter number for the heap count (glibc's malloc.h)


def _glibc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """glibc's function `name` (returning int, taking `argtypes`), None on another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    function = getattr(ctypes.CDLL(None), name, None)
    if function is not None:
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


def one_heap() -> bool:
    """Make threads that allocate for the first time from now on share glibc's main heap; True
    when set, False on another C library. Call it before starting threads."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and mallopt(M_ARENA_MAX, 1) == 1


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)` (returns 1 when it released memory), None on another C
    library."""
    function = _glibc("malloc_trim", ctypes.c_size_t)
    return None if function is None else lambda: function(0)


class Trimmer(threading.Thread):
    """A daemon thread calling `trim` every `every_s` seconds until `stop`; `trims` counts the
    calls."""

    def __init__(
        self, every_s: float = TRIM_SECONDS, trim: Callable[[], int] | None = None
    ) -> None:
        super().__init__(name="malloc-trim", daemon=True)
        self.every_s = every_s
        self.trim = trim or malloc_trim()
        self.trims = 0
        self._stopping = threading.Event()

    def start(self) -> bool:  # type: ignore[override]
        """Start trimming; False (and no thread) where there is no `malloc_trim`."""
        if self.trim is None:
            return False
        super().start()
        return True

    def run(self) -> None:
        while not self._stopping.wait(self.every_s):
            try:
                self.trim()
            except Exception:  # never take the daemon down for a trim
                log.exception("malloc_trim failed; resident memory may stay high")
                return
            self.trims += 1

    def stop(self) -> None:
        """End the thread (after the trim under way, if any)."""
        self._stopping.set()
        if self.is_alive():
            self.join()
