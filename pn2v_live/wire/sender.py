"""Sending frames to a pn2v-live receiver, with resume after a receiver restart.

    with FrameSender("tcp://127.0.0.1:5555") as sender:
        sender.send_stack("cells_01", stack)          # (T, Y, X), frame numbers 0..T-1
        sender.ensure_stored("cells_01", stack)       # resend whatever the receiver lacks
        sender.end("cells_01", frames=len(stack))

`send_frame` never waits for acknowledgement (PUSH, blocked only by backpressure). The receiver's
status socket (frame port + 1) says which frames are stored durably; `ensure_stored` resends the
missing ones until all are stored, which survives any number of receiver crashes. Resending a
frame that is already stored is harmless: the receiver ignores duplicates. A frame the receiver
could not store (a dtype other than uint8/uint16, a plane other than c = z = 0) raises
`protocol.ProtocolError` saying why, before it is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import zmq

from pn2v_live.storage.physical import Physical
from pn2v_live.wire.protocol import encode_end, encode_frame, status_endpoint

log = logging.getLogger(__name__)


class FrameSender:
    """PUSH frames to `to` and query the receiver's status socket (default: port + 1)."""

    def __init__(
        self,
        to: str,
        status: str | None = None,
        high_water_mark: int = 64,
        send_timeout: float | None = None,
    ) -> None:
        """`send_timeout`: seconds a frame may wait for the receiver before TimeoutError
        (default: wait as long as backpressure lasts)."""
        self.to = to
        self.send_timeout = send_timeout
        self.status_address = status or status_endpoint(to)
        self._context = zmq.Context()
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, high_water_mark)
        self._push.setsockopt(zmq.LINGER, 2000)
        self._push.connect(to)
        self._request: zmq.Socket | None = None

    def __enter__(self) -> FrameSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets, waiting up to 2 s for queued frames to leave."""
        if self._request is not None:
            self._request.close(linger=0)
        self._push.close()
        self._context.term()

    def send_frame(
        self,
        acquisition: str,
        index: int,
        frame: np.ndarray,
        timestamp: float | None = None,
        physical: Physical | None = None,
        timeout: float | None = None,
        sensor_origin: tuple[int, int] | None = None,
    ) -> None:
        """Queue one (Y, X) frame, with `physical`'s pixel size and frame interval and its
        `sensor_origin` (row, column) when known; blocks while the receiver applies
        backpressure, at most `timeout` seconds (default the sender's `send_timeout`; 0: only
        when the queue has room now), then TimeoutError. ProtocolError (a ValueError) for a
        frame the receiver could not store."""
        parts = encode_frame(
            acquisition,
            index,
            frame,
            timestamp,
            storable=True,
            physical=physical,
            sensor_origin=sensor_origin,
        )
        self._send(parts, self.send_timeout if timeout is None else timeout)

    def send_stack(
        self,
        acquisition: str,
        stack: np.ndarray | Sequence[np.ndarray],
        indices: Sequence[int] | None = None,
        fps: float | None = None,
        physical: Physical | None = None,
    ) -> None:
        """Send frames `indices` (default all) of a (T, Y, X) stack, optionally paced at `fps`,
        each with `physical` (see `send_frame`)."""
        indices = range(len(stack)) if indices is None else indices
        start = time.monotonic()
        for n, t in enumerate(indices):
            if fps:
                time.sleep(max(0.0, start + n / fps - time.monotonic()))
            self.send_frame(acquisition, t, stack[t], physical=physical)

    def end(
        self, acquisition: str, frames: int | None = None, confirm_timeout: float | None = None
    ) -> None:
        """Tell the receiver the acquisition is complete (optionally with its frame count).

        With `confirm_timeout`, wait until the receiver reports it closed (TimeoutError if not).
        """
        self._send(encode_end(acquisition, frames), self.send_timeout)
        if confirm_timeout is None:
            return
        deadline = time.monotonic() + confirm_timeout
        while time.monotonic() < deadline:
            reply = self.status(acquisition, timeout=max(0.1, deadline - time.monotonic()))
            if reply is not None and reply["closed"]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{acquisition}: the receiver did not confirm the end marker")

    def _send(self, parts: list, timeout: float | None) -> None:
        """Send one message, waiting at most `timeout` seconds (None: as long as it takes)."""
        self._push.setsockopt(zmq.SNDTIMEO, -1 if timeout is None else int(timeout * 1000))
        try:
            self._push.send_multipart(parts, copy=False)
        except zmq.Again:
            raise TimeoutError(
                f"no receiver at {self.to} took a frame within {timeout} s"
            ) from None

    def status(self, acquisition: str, timeout: float = 2.0) -> dict | None:
        """The receiver's status of `acquisition`, or None when it does not answer in time."""
        if self._request is None:
            self._request = self._context.socket(zmq.REQ)
            self._request.connect(self.status_address)
        self._request.send_json({"acquisition": acquisition})
        if self._request.poll(int(timeout * 1000)):
            reply = self._request.recv_json()
            if "error" in reply:
                raise ValueError(f"receiver refused the status request: {reply['error']}")
            return reply
        # Lazy pirate: a REQ socket without its reply is stuck, so start a fresh one.
        self._request.close(linger=0)
        self._request = None
        return None

    def missing(self, acquisition: str, frames: int, timeout: float = 2.0) -> list[int] | None:
        """Frame numbers in 0..frames-1 not yet stored, or None when the receiver is silent."""
        reply = self.status(acquisition, timeout)
        if reply is None:
            return None
        stored = np.zeros(frames, bool)
        for start, stop in reply["stored"]:
            stored[start:stop] = True
        return np.flatnonzero(~stored).tolist()

    def ensure_stored(
        self,
        acquisition: str,
        stack: np.ndarray | Sequence[np.ndarray],
        timeout: float = 60.0,
        patience: float = 1.0,
        physical: Physical | None = None,
    ) -> None:
        """Resend missing frames of `stack` (with `physical`, see `send_frame`) until the
        receiver has stored all of them.

        Frames still queued at the receiver get `patience` seconds before they are resent.
        Raises TimeoutError after `timeout` seconds without completion.
        """
        deadline = time.monotonic() + timeout
        last_missing: int | None = None
        last_progress = time.monotonic()
        while time.monotonic() < deadline:
            missing = self.missing(acquisition, len(stack))
            if missing == []:
                return
            now = time.monotonic()
            if missing is None:
                continue  # receiver down or restarting: ask again
            if len(missing) != last_missing:
                last_missing, last_progress = len(missing), now
            elif now - last_progress >= patience:
                log.info("resending %d frame(s) of %s", len(missing), acquisition)
                self.send_stack(acquisition, stack, missing, physical=physical)
                last_progress = now
            time.sleep(0.1)
        raise TimeoutError(f"{acquisition}: receiver did not store all {len(stack)} frames")
