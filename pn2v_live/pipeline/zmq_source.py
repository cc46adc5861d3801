"""ZeroMQ ingest: a PULL socket for frames and a REP socket answering "what is stored?".

One receiver thread owns both sockets. It decodes and validates each message (`storable`: a
frame the store cannot keep is refused at once, with its reason) and hands good frames to a
queue drained by writer threads. The queue is bounded twice: `queue_frames` messages and
`queue_bytes` bytes (messages queued or being written; one message may take it past the byte
bound, so a frame bigger than the whole bound is still taken when nothing else is held). While
either bound is reached it stops reading the PULL socket, so messages pile up to the socket's
small high-water mark (RECEIVE_HWM messages per sender) and then block the sender's PUSH:
storage slower than acquisition slows the sender down instead of losing frames, and the memory
that received frames hold stays below about queue_bytes + (1 + RECEIVE_HWM per sender) messages
of at most MAX_MESSAGE_BYTES. The backlog is `health()["queue"]` / `["queue_bytes"]` and the
`pn2v_live_ingest_queue_frames` / `pn2v_live_receive_queue_bytes` gauges.

Status requests (REP, JSON) say what is stored of an acquisition, so that a sender resumes:
`zmq_status`. While the store's disk is full, new frames are refused, not stored, until one fits
again: `disk_refusal`.

Health: `health_reports` gives the receiver's and each writer's liveness (see `stage.Liveness`)
for the daemon's watchdog: a thread that ended or hangs is unhealthy; writers refusing frames on
a full disk are "paused" (healthy: a restart would not help).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time

import numpy as np
import zmq

from pn2v_live.errors import UserError
from pn2v_live.pipeline.disk_refusal import DISK_FULL, DiskRefusal
from pn2v_live.pipeline.ingest import ingested, reject
from pn2v_live.pipeline.stage import Failures, Liveness, describe, failure_reason
from pn2v_live.pipeline.zmq_messages import store_message
from pn2v_live.pipeline.zmq_status import status_reply
from pn2v_live.storage.rejected import FrameCheck, Rejected
from pn2v_live.storage.store import Store
from pn2v_live.telemetry import (
    FRAMES_REJECTED,
    INGEST_QUEUE,
    RECEIVE_QUEUE_BYTES,
    RECEIVE_QUEUE_LIMIT_BYTES,
)
from pn2v_live.wire.protocol import (
    MAX_HEADER_BYTES,
    MAX_PIXELS,
    STORED_DTYPES,
    EndMessage,
    FrameMessage,
    ProtocolError,
    decode_message,
    status_endpoint,
)

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
SOURCE = "zmq"
IDLE_SECONDS = 0.2  # a writer idle this long settles the store (`Store.settle`)
DEFAULT_QUEUE_BYTES = 512 << 20  # received frames held in memory before backpressure
RECEIVE_HWM = 4  # messages libzmq buffers per sender while the queue is full
# The largest message a storable frame makes; a bigger one is refused by libzmq before it is
# received (no huge allocation; libzmq drops that sender's connection).
MAX_STORED_ITEMSIZE = max(np.dtype(name).itemsize for name in STORED_DTYPES)
MAX_MESSAGE_BYTES = MAX_HEADER_BYTES + MAX_PIXELS * MAX_STORED_ITEMSIZE
MAX_STATUS_BYTES = 1 << 16  # a status request is a few dozen bytes; a bigger one drops its peer
PROBE_FILE = ".disk-probe"  # in the store's root, written while refusing to see if space is back
PROBE_BYTES = 256 * 1024
RECEIVER = "zmq-receive"  # thread names, also the `stage` of their metrics
WRITER = "zmq-write"


class ZmqSource:
    """Receives frames on `bind` (PULL) and answers status queries on `status_bind` (REP)."""

    def __init__(
        self,
        store: Store,
        bind: str = DEFAULT_BIND,
        status_bind: str | None = None,
        queue_frames: int = 64,
        writers: int = 2,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        check: FrameCheck | None = None,  # refuses frames it cannot denoise (camera maps)
    ) -> None:
        if queue_bytes < 1 or queue_frames < 1:
            raise ValueError(f"queue bounds must be >= 1, got {queue_frames}, {queue_bytes}")
        self.store, self.check = store, check
        self.bind = bind
        self.status_bind = status_bind or status_endpoint(bind)
        self.writers = writers
        self.queue_bytes = queue_bytes
        # Messages with their size in bytes, which `_held` counts until they are handled.
        self._queue: queue.Queue[tuple[FrameMessage | EndMessage, int]] = queue.Queue(
            maxsize=queue_frames
        )
        self._held = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._context: zmq.Context | None = None
        self._counts = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0}
        self._counts_lock = threading.Lock()
        self._state = "stopped"
        self._last_error: str | None = None
        self._beats: dict[str, float] = {}  # thread name → when its loop last came round
        self._ended: dict[str, str] = {}  # thread name → what ended it
        # Messages that did not store, and status requests or decodings that failed:
        self._store_failures = Failures(WRITER, log, store.root, per_item=True)
        self._receive_failures = Failures(RECEIVER, log, per_item=True)
        self._refusing = DiskRefusal(self._store_failures)  # new frames, while the disk is full

    # lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind both sockets (UserError when an address is taken) and start the threads."""
        self._context = zmq.Context()
        pull = self._context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, min(RECEIVE_HWM, self._queue.maxsize))
        pull.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        pull.setsockopt(zmq.LINGER, 0)
        status = self._context.socket(zmq.REP)
        status.setsockopt(zmq.MAXMSGSIZE, MAX_STATUS_BYTES)
        status.setsockopt(zmq.LINGER, 0)
        for socket, address in ((pull, self.bind), (status, self.status_bind)):
            try:
                socket.bind(address)
            except zmq.ZMQError as error:
                pull.close()
                status.close()
                self._context.term()
                raise UserError(
                    f"cannot listen on {address}: {error}; is another pn2v-live running? "
                    "Choose another address."
                ) from error
        # A wildcard port (tcp://HOST:*) is resolved now; senders need the real one.
        self.bind = pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.status_bind = status.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop.clear()
        self._state = "running"
        RECEIVE_QUEUE_LIMIT_BYTES.set(self.queue_bytes)
        self._threads = [
            threading.Thread(target=self._receive, args=(pull, status), name=RECEIVER)
        ] + [
            threading.Thread(target=self._write, name=f"{WRITER}-{k}") for k in range(self.writers)
        ]
        now = time.monotonic()
        for thread in self._threads:
            self._beats[thread.name] = now
            thread.start()
        log.info("receiving frames on %s, status on %s", self.bind, self.status_bind)

    def stop(self) -> None:
        """Stop receiving, store what is queued, publish metadata, close the sockets."""
        self._state = "stopping"
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self._context is not None:
            self._context.term()
            self._context = None
        self._settle()
        self._state = "stopped"

    def health(self) -> dict:
        """State ("running", "stopped", "failed", ...), queue length in messages and in bytes,
        message counts, and the reason frames are refused now (None when they are not)."""
        with self._counts_lock:
            counts = dict(self._counts)
            held = self._held
        dead = self._state == "running" and not all(t.is_alive() for t in self._threads)
        refusal = self._refusing.current
        return {
            "state": "failed" if dead else self._state,
            "queue": self._queue.qsize(),
            "queue_bytes": held,
            "queue_limit_bytes": self.queue_bytes,
            **counts,
            "last_error": self._last_error,
            "refusing": refusal.reason if refusal else None,
        }

    def health_reports(self, max_silence: float) -> list[Liveness]:
        """The liveness of the receiver and of each writer thread (see the module docstring)."""
        now, refusal, reports = time.monotonic(), self._refusing.current, []
        for thread in self._threads:
            name = thread.name
            silent = now - self._beats.get(name, now)
            if not thread.is_alive():
                state = "stopped" if self._stop.is_set() else "dead"
                reports.append(Liveness(name, state, detail=self._ended.get(name, "ended")))
            elif silent >= max_silence:
                reports.append(Liveness(name, "stuck", detail=f"no progress for {silent:.0f} s"))
            elif refusal is not None and name != RECEIVER:
                since = time.strftime("%H:%M:%S", time.localtime(refusal.since))
                detail = f"refusing new frames since {since}, {refusal.refused} so far"
                reports.append(Liveness(name, "paused", refusal.reason, detail))
            else:
                reports.append(Liveness(name, "ok"))
        return reports

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

    def _full(self) -> bool:
        """Whether the queue holds its bound of messages or of bytes."""
        return self._queue.full() or self._held >= self.queue_bytes

    def _hold(self, size: int) -> None:
        """Count `size` bytes more (a received message) or less (a handled one)."""
        with self._counts_lock:  # the gauge too: set outside, an older value could land last
            self._held += size
            RECEIVE_QUEUE_BYTES.set(self._held)

    # receiver thread --------------------------------------------------------------------

    def _receive(self, pull: zmq.Socket, status: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(status, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._beats[RECEIVER] = time.monotonic()
                # Read frames only while the queue has room: backpressure through the HWM.
                poller.modify(pull, 0 if self._full() else zmq.POLLIN)
                events = dict(poller.poll(100))
                if status in events:
                    request = status.recv_multipart()  # all parts, or REP cannot reply
                    try:
                        reply = self._status(request)
                    except Exception as error:  # e.g. an acquisition damaged on disk
                        self._receive_failures.failed(error, "a status request")
                        reply = {"error": describe(error)}
                    else:
                        self._receive_failures.succeeded(quiet=True)
                    status.send_json(reply)
                if pull in events:
                    self._accept(pull.recv_multipart(copy=False))
        except BaseException as error:  # the receiver is gone: say so, the health check sees it
            self._ended[RECEIVER] = describe(error)
            log.critical(
                "the ZeroMQ receiver stopped (%s): frames and status requests on %s and %s are "
                "no longer answered; the daemon reports itself unhealthy",
                describe(error),
                self.bind,
                self.status_bind,
                exc_info=error,
            )
        finally:
            pull.close()
            status.close()

    def _accept(self, parts: list[zmq.Frame]) -> None:
        self._count("received")
        buffers = [part.buffer for part in parts]
        try:
            message = decode_message(buffers, storable=True)
        except ProtocolError as error:
            self._count("rejected")
            reject(SOURCE, Rejected(error.reason, str(error)), "message")
            return
        except Exception as error:  # a bug in decoding: this message is lost, not the receiver
            self._count("rejected")
            FRAMES_REJECTED.labels(source=SOURCE, reason="error").inc()
            self._receive_failures.failed(error, "decoding a message")
            return
        size = sum(buffer.nbytes for buffer in buffers)
        self._hold(size)
        self._queue.put_nowait((message, size))
        INGEST_QUEUE.set(self._queue.qsize())

    def _status(self, request: list[bytes]) -> dict:
        """Answer one status query (`zmq_status.status_reply`)."""
        refusal = self._refusing.current
        receiver = {
            "queue": self._queue.qsize(),
            "queue_bytes": self._held,
            "queue_limit_bytes": self.queue_bytes,
            "refusing": refusal.as_reply() if refusal else None,
        }
        return status_reply(self.store, request, receiver)

    # writer threads ---------------------------------------------------------------------

    def _write(self) -> None:
        name = threading.current_thread().name
        try:
            while True:
                self._beats[name] = time.monotonic()
                try:
                    message, size = self._queue.get(timeout=IDLE_SECONDS)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    self._probe_disk()
                    self._settle()
                    continue
                INGEST_QUEUE.set(self._queue.qsize())
                try:
                    self._store(message)
                finally:
                    del message  # its buffer is freed now, not at the next message
                    self._hold(-size)
        except BaseException as error:  # a writer is gone: the health check sees it
            self._ended[name] = describe(error)
            log.critical("ZeroMQ writer %s stopped: %s", name, describe(error), exc_info=error)

    def _store(self, message: FrameMessage | EndMessage) -> None:
        """Store one message, or refuse it while the disk is full (`DiskRefusal.admit`)."""
        admitted = self._refusing.admit(message)
        if admitted == "kept":
            return
        if admitted == "refused":
            self._count("rejected")
            FRAMES_REJECTED.labels(source=SOURCE, reason=DISK_FULL).inc()
            return
        probe = admitted == "probe"
        try:
            wrote = self._handle(message)
        except Rejected as error:
            self._count("rejected")
            reject(SOURCE, error, f"a message for {message.acquisition}")
            self._stored(probe, wrote=False)
        except Exception as error:  # disk full, permissions: keep running, sender resends
            self._failed(message, error, probe)
        else:
            self._stored(probe, wrote)

    def _probe_disk(self) -> None:
        """While refusing and no frame comes to try the disk with: once the back-off is over
        or space was freed, write (and fsync, and remove) PROBE_BYTES in the store's root; when
        that fits, frames are taken again (and "refusing" is null) without waiting for one."""
        if not self._refusing.probe_due():
            return
        probe = self.store.root / PROBE_FILE
        try:
            with open(probe, "wb") as file:
                file.write(bytes(PROBE_BYTES))
                file.flush()
                os.fsync(file.fileno())
        except Exception as error:
            self._write_failed(error, probe=True, what="trying the disk")
        else:
            self._stored(probe=True, wrote=True)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()

    def _stored(self, probe: bool, wrote: bool) -> None:
        """After a message was handled (`DiskRefusal.handled`); once the refusal ends, the end
        markers kept meanwhile are written."""
        for name, frames in self._refusing.handled(probe, wrote).items():
            self._store(EndMessage(name, frames))

    def _failed(self, message: FrameMessage | EndMessage, error: Exception, probe: bool) -> None:
        """A message that could not be stored: counted and logged when due (`Failures`); a full
        disk starts (or prolongs) the refusal of new frames."""
        self._count("rejected")
        full = failure_reason(error) == DISK_FULL
        FRAMES_REJECTED.labels(source=SOURCE, reason=DISK_FULL if full else "error").inc()
        end = isinstance(message, EndMessage)
        if full and end:
            self._refusing.keep_end(message)
        what = "closing an acquisition" if end else "storing a frame"
        self._write_failed(error, probe, what, message.acquisition)

    def _write_failed(
        self, error: Exception, probe: bool, what: str, acquisition: str | None = None
    ) -> None:
        """A write that failed is the last error; see `DiskRefusal.failed`."""
        self._last_error = describe(error)
        self._refusing.failed(error, probe, what, acquisition)

    def _handle(self, message: FrameMessage | EndMessage) -> bool:
        """Store a frame or close an acquisition (`store_message`); False for a duplicate
        (nothing written)."""
        outcome = store_message(self.store, message, self.check)
        if outcome == "duplicate":
            self._count("duplicates")
            return False
        if outcome == "stored":
            ingested(SOURCE)
            self._count("stored")
        return True

    def _settle(self) -> None:
        """Publish and trim the acquisitions given frames (`Store.settle`); a metadata write
        that fails (disk full) is the last error until it works (the store retries it)."""
        for error in self.store.settle().values():
            self._last_error = f"{type(error).__name__}: {error}"
