"""While the store's disk is full, the ZeroMQ receiver refuses new frames instead of failing each.

A full disk (ENOSPC, EDQUOT) is not a per-frame error: from the first frame that does not fit,
new frames are refused unwritten (`pn2v_live_frames_rejected_total{reason="disk_full"}`) and the
status reply's `refusing` says so (`Refusal.as_reply`, else null), so a sender keeps them and
resends the missing ones later. One frame now and then tries the disk again (after 1 s, doubling
up to 5 min, at once when space is freed); once it is stored, frames are taken again, and end
markers that could not be written then are written.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

from pn2v_live.pipeline.stage import MAX_BACKOFF_SECONDS, Failures, failure_reason
from pn2v_live.wire.protocol import EndMessage, FrameMessage

log = logging.getLogger("pn2v_live.pipeline.zmq_source")  # the receiver's lines, as one component

DISK_FULL = "disk_full"  # the one reason frames are refused
REFUSING_DETAIL = (
    "the store's disk is full: new frames are refused, not stored; keep them and resend the "
    'ones missing from "stored" once "refusing" is null'
)


@dataclass
class Refusal:
    """While frames are refused: why, since when (Unix time), from when one frame may try the
    disk again (monotonic; inf while one tries), and how many were refused."""

    reason: str
    since: float
    retry_at: float
    refused: int = 0

    def as_reply(self) -> dict:
        return {"reason": self.reason, "since": self.since, "detail": REFUSING_DETAIL}


class DiskRefusal:
    """Whether new frames are refused (disk full) and when one may try the disk again; shared
    by the writer threads (thread-safe). `failures` are the writers' (their back-off decides
    when a frame tries again)."""

    def __init__(self, failures: Failures) -> None:
        self.failures = failures
        self._refusal: Refusal | None = None  # set while frames are refused
        self._lock = threading.Lock()
        self._pending_ends: dict[str, int | None] = {}  # end markers to write once space returns

    @property
    def current(self) -> Refusal | None:
        """The refusal in force, or None while frames are taken."""
        return self._refusal

    def admit(self, message: FrameMessage | EndMessage) -> str:
        """Whether to store `message` now: "store"; "probe" while refusing, for the one frame
        that tries the full disk again (after the back-off, or once space was freed); "kept" for
        an end marker, written once frames store again; "refused" for a frame (counted)."""
        with self._lock:
            refusal = self._refusal
            if refusal is None:
                return "store"
            if isinstance(message, EndMessage):
                self._pending_ends[message.acquisition] = message.frames
                log.info("end marker of %s kept until frames are stored again", message.acquisition)
                return "kept"
            if refusal.retry_at <= time.monotonic() or (
                refusal.retry_at < math.inf and self.failures.space_returned()
            ):
                refusal.retry_at = math.inf  # until this frame's write says how the disk is
                return "probe"
            refusal.refused += 1
            return "refused"

    def probe_due(self) -> bool:
        """While refusing and no frame comes to try the disk with: whether the back-off is over
        or space was freed, so that the caller tries the disk itself now (then `handled`)."""
        with self._lock:
            refusal = self._refusal
            if refusal is None or refusal.retry_at == math.inf:
                return False
            if refusal.retry_at > time.monotonic() and not self.failures.space_returned():
                return False
            refusal.retry_at = math.inf
            return True

    def handled(self, probe: bool, wrote: bool) -> dict[str, int | None]:
        """After a message was handled: a probe that wrote ends the refusal; one that did not
        write (a duplicate, a rejected message) lets the next frame try. Returns the end
        markers kept while refusing (acquisition → frames announced), to write now ({} while
        the refusal goes on, or when there was none)."""
        with self._lock:
            refusal = self._refusal
            if refusal is not None and probe and not wrote:
                refusal.retry_at = time.monotonic()
            if refusal is None or not (probe and wrote):
                if wrote and refusal is None:
                    self.failures.succeeded(quiet=True)
                return {}
            self._refusal = None
            ends, self._pending_ends = self._pending_ends, {}
        self.failures.succeeded(quiet=True)
        log.info(
            "storing frames again: %d frame(s) were refused over %.0f s (%s); their senders "
            "resend them",
            refusal.refused,
            time.time() - refusal.since,
            refusal.reason,
        )
        return ends

    def keep_end(self, message: EndMessage) -> None:
        """Write this end marker once frames store again (it failed on the full disk)."""
        with self._lock:
            self._pending_ends[message.acquisition] = message.frames

    def failed(
        self, error: Exception, probe: bool, what: str, acquisition: str | None = None
    ) -> None:
        """Count and log (when due) a write that failed; a full disk starts or prolongs the
        refusal of new frames, another error lets the next frame try the disk."""
        delay = self.failures.failed(error, what, acquisition)
        with self._lock:
            refusal = self._refusal
            if failure_reason(error) != DISK_FULL:
                if refusal is not None and probe:
                    refusal.retry_at = time.monotonic()
                return
            if refusal is not None:
                refusal.retry_at = time.monotonic() + delay
                return
            self._refusal = Refusal(DISK_FULL, time.time(), time.monotonic() + delay)
        log.error(
            "the store's disk is full: new frames are refused, not stored, until one fits again "
            "(one tries after %.0f s, then less and less often up to every %.0f min, and at once "
            "when space is freed); senders keep them and resend, the status reply says "
            '"refusing"',
            delay,
            MAX_BACKOFF_SECONDS / 60,
        )
