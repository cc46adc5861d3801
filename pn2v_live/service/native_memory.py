"""The daemon's native memory: what torch frees goes back to the system every few seconds.

glibc serves a request of at least its mmap threshold with a mapping of its own, unmapped again
when freed; smaller ones come from the heap ("arena") of the thread asking. The threshold starts
at 128 KiB but rises to the size of every such block freed (up to 32 MiB on 64-bit systems), so
once torch has freed its first tensors, its buffers of 1–32 MiB (the U-Net's activations, the
MMSE's 8 MB chunks of K samples, training batches and their gradients) are carved out of the
trainer's and inference's arenas, and what they leave free there stays resident and creeps up
with the arenas' high-water marks: in `bench --part soak` malloc held 590 MB of which 250 MB
were in use (docs/soak.md).

`Trimmer` calls glibc's `malloc_trim(0)` every TRIM_SECONDS, which hands the free pages of every
arena back (madvise), so free pages cannot pile up behind the arenas' high-water marks for
longer than that. Fixing the mmap threshold instead (`mallopt`, MALLOC_MMAP_THRESHOLD_) kept
memory lower still but made every buffer of a MiB or more a fresh mapping, zero-filled page by
page: inference and training steps 20–50 % slower.
On another C library there is nothing to do (`Trimmer.start` returns False).
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

TRIM_SECONDS = 10.0  # free arena pages go back to the system this often


def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)` (returns 1 when it released memory), None on another C
    library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    function = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if function is None:
        return None
    function.argtypes, function.restype = (ctypes.c_size_t,), ctypes.c_int
    return lambda: function(0)


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
        self._stopping.set()
