"""ZeroMQ ingest: a PULL socket for frames and a REP socket answering "what is stored?".

One receiver thread owns both sockets. It decodes and validates each message and hands good
frames to a bounded queue drained by writer threads. While the queue is full it stops reading
the PULL socket, so messages pile up to the socket's high-water mark and then block the
sender's PUSH: storage slower than acquisition slows the sender down instead of losing frames.
The backlog is `health()["queue"]` and the `pn2v_live_ingest_queue_frames` gauge.

Status requests (REP, JSON): `{"acquisition": name}` → `{"acquisition", "known", "stored":
[[start, stop), ...], "valid_t", "closed", "queue"}`. A sender resumes by resending the frames
missing from `stored` (see `sender.FrameSender`); a duplicate of a stored frame is ignored.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from urllib.parse import urlsplit

import zmq

from pn2v_live.errors import UserError
from pn2v_live.metrics import FRAMES_REJECTED, INGEST_QUEUE
from pn2v_live.pipeline.ingest import Rejected, open_acquisition, reject, store_frame
from pn2v_live.pipeline.protocol import EndMessage, FrameMessage, ProtocolError, decode_message
from pn2v_live.storage.store import Acquisition, Store, validate_name

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5555"
SOURCE = "zmq"
IDLE_SECONDS = 0.2  # a writer idle this long trims the arrays to their exact length
PUBLISH_SECONDS = 0.25  # under load, valid_t on disk lags the stored frames by at most this
MAX_MESSAGE_BYTES = 1 << 30  # refused by libzmq before it is received: no huge allocation
MAX_STATUS_BYTES = 1 << 16  # a status request is a few dozen bytes; a bigger one drops its peer


def status_endpoint(endpoint: str) -> str:
    """The status (REP) endpoint paired with a frame endpoint: same host, port + 1 (a wildcard
    port `*`, which the system resolves when binding, pairs with another wildcard)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":*"):
        return endpoint
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise UserError(
            f"cannot derive a status endpoint from {endpoint!r}: give tcp://HOST:PORT "
            "or name the status endpoint explicitly"
        )
    return f"tcp://{parts.hostname}:{parts.port + 1}"


def stored_ranges(frames: list[int]) -> list[list[int]]:
    """Sorted frame indices as half-open ranges: [0, 1, 2, 5] → [[0, 3], [5, 6]]."""
    ranges: list[list[int]] = []
    for t in frames:
        if ranges and ranges[-1][1] == t:
            ranges[-1][1] = t + 1
        else:
            ranges.append([t, t + 1])
    return ranges


class ZmqSource:
    """Receives frames on `bind` (PULL) and answers status queries on `status_bind` (REP)."""

    def __init__(
        self,
        store: Store,
        bind: str = DEFAULT_BIND,
        status_bind: str | None = None,
        queue_frames: int = 64,
        writers: int = 2,
    ) -> None:
        self.store = store
        self.bind = bind
        self.status_bind = status_bind or status_endpoint(bind)
        self.writers = writers
        self._queue: queue.Queue[FrameMessage | EndMessage] = queue.Queue(maxsize=queue_frames)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._context: zmq.Context | None = None
        self._counts = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0}
        self._counts_lock = threading.Lock()
        self._touched: set[Acquisition] = set()
        self._published = 0.0
        self._state = "stopped"
        self._last_error: str | None = None
        self._flush_failing: set[str] = set()  # acquisitions whose metadata write fails now

    # lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind both sockets (UserError when an address is taken) and start the threads."""
        self._context = zmq.Context()
        pull = self._context.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, self._queue.maxsize)
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
        self._threads = [
            threading.Thread(target=self._receive, args=(pull, status), name="zmq-receive")
        ] + [
            threading.Thread(target=self._write, name=f"zmq-write-{k}") for k in range(self.writers)
        ]
        for thread in self._threads:
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
        self._flush_all(trim=True)
        self._state = "stopped"

    def health(self) -> dict:
        """State ("running", "stopped", "failed", ...), queue length and message counts."""
        with self._counts_lock:
            counts = dict(self._counts)
        dead = self._state == "running" and not all(t.is_alive() for t in self._threads)
        return {
            "state": "failed" if dead else self._state,
            "queue": self._queue.qsize(),
            **counts,
            "last_error": self._last_error,
        }

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

    # receiver thread --------------------------------------------------------------------

    def _receive(self, pull: zmq.Socket, status: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(status, zmq.POLLIN)
        poller.register(pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                # Read frames only while the queue has room: backpressure through the HWM.
                poller.modify(pull, 0 if self._queue.full() else zmq.POLLIN)
                events = dict(poller.poll(100))
                if status in events:
                    request = status.recv_multipart()  # all parts, or REP cannot reply
                    try:
                        reply = self._status(request)
                    except Exception as error:  # e.g. an acquisition damaged on disk
                        log.exception("status request failed")
                        reply = {"error": f"{type(error).__name__}: {error}"}
                    status.send_json(reply)
                if pull in events:
                    self._accept(pull.recv_multipart(copy=False))
        finally:
            pull.close()
            status.close()

    def _accept(self, parts: list[zmq.Frame]) -> None:
        self._count("received")
        try:
            message = decode_message([part.buffer for part in parts])
        except ProtocolError as error:
            self._count("rejected")
            reject(SOURCE, Rejected(error.reason, str(error)), "message")
            return
        self._queue.put_nowait(message)
        INGEST_QUEUE.set(self._queue.qsize())

    def _status(self, request: list[bytes]) -> dict:
        """Answer one status query (a malformed one gets {"error": ...})."""
        try:
            if len(request) != 1:
                raise ValueError(f"got {len(request)} message parts, expected 1")
            name = validate_name(json.loads(request[0])["acquisition"])
        except (ValueError, KeyError, TypeError, RecursionError) as error:
            return {"error": f'status request must be {{"acquisition": NAME}}: {error}'}
        reply = {"acquisition": name, "known": True, "queue": self._queue.qsize()}
        try:
            acquisition = self.store.acquisition(name)
        except KeyError:
            return reply | {"known": False, "stored": [], "valid_t": 0, "closed": False}
        return reply | {
            "stored": stored_ranges(acquisition.stored_frames()),
            "valid_t": acquisition.valid_t,
            "closed": acquisition.closed,
        }

    # writer threads ---------------------------------------------------------------------

    def _write(self) -> None:
        while True:
            try:
                message = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                if self._stop.is_set():
                    return
                self._flush_all(trim=True)
                continue
            INGEST_QUEUE.set(self._queue.qsize())
            try:
                self._handle(message)
            except Rejected as error:
                self._count("rejected")
                reject(SOURCE, error, f"a message for {message.acquisition}")
            except Exception as error:  # disk full, permissions: keep running, sender resends
                self._count("rejected")
                self._last_error = f"{type(error).__name__}: {error}"
                FRAMES_REJECTED.labels(source=SOURCE, reason="error").inc()
                log.exception("could not store a frame of %s", message.acquisition)
            if time.monotonic() - self._published > PUBLISH_SECONDS:
                self._flush_all(trim=False)

    def _handle(self, message: FrameMessage | EndMessage) -> None:
        if isinstance(message, EndMessage):
            try:
                acquisition = self.store.acquisition(message.acquisition)
            except KeyError:
                raise Rejected(
                    "unknown", f"end marker for {message.acquisition!r}, which has no frames"
                ) from None
            acquisition.close(message.frames)
            log.info(
                "%s closed by its sender (%s frames announced)", acquisition.name, message.frames
            )
            return
        if message.c or message.z:
            raise Rejected("plane", "only single-plane frames (c = 0, z = 0) are stored")
        acquisition = open_acquisition(
            self.store, message.acquisition, message.pixels.shape, message.pixels.dtype
        )
        if store_frame(acquisition, message.index, message.pixels, SOURCE, publish=False):
            with self._counts_lock:
                self._touched.add(acquisition)
            self._count("stored")
        else:
            self._count("duplicates")

    def _flush_all(self, trim: bool) -> None:
        """Write valid_t of the acquisitions stored to since the last trim (see `flush`).

        A flush that fails (disk full) leaves its acquisition pending for the next; the first
        failure and the recovery are logged, not every retry (idle writers retry 5 times a second).
        """
        self._published = time.monotonic()
        with self._counts_lock:
            touched = list(self._touched)
            if trim:
                self._touched = set()
        failed = []
        for acquisition in touched:
            try:
                acquisition.flush(trim=trim)
            except Exception as error:
                failed.append(acquisition)
                self._last_error = f"{type(error).__name__}: {error}"
                if acquisition.name not in self._flush_failing:
                    self._flush_failing.add(acquisition.name)
                    log.error("could not write the metadata of %s, retrying: %s",
                              acquisition.name, error)  # fmt: skip
                continue
            if acquisition.name in self._flush_failing:
                self._flush_failing.discard(acquisition.name)
                log.info("metadata of %s written again", acquisition.name)
        with self._counts_lock:
            self._touched.update(failed)
