"""The viewer's live updates: server-sent events `acquisitions` and `status` to every open page.

A watcher polls what the pages show and pushes each changed state, encoded once, to every
stream; browsers never poll per frame. Each stream keeps only the newest unsent state per
event kind (a client that does not read holds two pending events at most, plus the socket's
bounded write buffer) and is dropped when a write has not gone through for `stalled_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from pn2v_live.service.viewer_requests import error_response, to_json

log = logging.getLogger("pn2v_live.service.viewer")  # the viewer's log lines

HEARTBEAT_SECONDS = 15.0
STALLED_SECONDS = 60.0  # an event stream whose write has not gone through this long is dropped

State = Callable[[], Awaitable[dict[str, object]]]  # what the pages show, by event kind


class LiveUpdates:
    """At most `max_streams` event streams (`refused` counts the 503s past that), fed every
    `poll_seconds` from `read_state` while any is open."""

    def __init__(self, read_state: State, max_streams: int, poll_seconds: float) -> None:
        self.read_state, self.max_streams, self.poll_seconds = read_state, max_streams, poll_seconds
        self.refused = 0
        self.streams: set[_Stream] = set()

    async def handle(self, request: web.Request, stalled_seconds: float) -> web.StreamResponse:
        """`GET /api/events`: the current state at once, then every change, until the browser
        goes away or stops reading."""
        if len(self.streams) >= self.max_streams:
            self.refused += 1
            return error_response(
                503,
                f"too many live views ({self.max_streams} event streams, viewer.max_streams); "
                "close another viewer tab or raise viewer.max_streams",
                **{"Retry-After": "10"},
            )
        stream = _Stream()  # counted before the first await, so the cap holds
        self.streams.add(stream)
        try:
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
            )
            await response.prepare(request)
            stream.transport = request.transport
            for kind, data in (await self.read_state()).items():
                if kind not in stream.pending:  # a newer state may have come meanwhile
                    stream.push(kind, _event(kind, data))
            while not stream.closed:
                try:
                    await asyncio.wait_for(stream.wake.wait(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    await asyncio.wait_for(response.write(b": heartbeat\n\n"), stalled_seconds)
                    continue
                stream.wake.clear()
                messages, stream.pending = stream.pending, {}
                for message in messages.values():
                    await asyncio.wait_for(response.write(message), stalled_seconds)
        except TimeoutError:
            # Abort, not close: a close would wait (forever) to flush what the client won't read.
            log.info("viewer: dropped an event stream whose client stopped reading")
            if request.transport is not None:
                request.transport.abort()
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            stream.close()
            self.streams.discard(stream)
        return response

    async def watch(self) -> None:
        """Push every changed state to every stream, replacing whatever older state of that
        kind a stream has not written yet."""
        last: dict[str, object] = {}
        while True:
            await asyncio.sleep(self.poll_seconds)
            if not self.streams:
                last.clear()
                continue
            try:
                current = await self.read_state()
            except Exception:  # a half-written acquisition must not end live updates
                log.exception("viewer could not read the store; retrying")
                continue
            for kind, data in current.items():
                if last.get(kind) != data:
                    message = _event(kind, data)
                    for stream in self.streams:
                        stream.push(kind, message)
            last = current

    def close(self) -> None:
        """End every stream."""
        for stream in self.streams:
            stream.close()

    async def stats(self) -> list[dict[str, int]]:
        """Per open stream: events and bytes waiting to be written, and bytes in the socket's
        user-space write buffer (what a client that does not read costs)."""
        return [
            {
                "pending_events": len(stream.pending),
                "pending_bytes": sum(len(m) for m in stream.pending.values()),
                "buffered_bytes": (
                    stream.transport.get_write_buffer_size()
                    if stream.transport is not None and not stream.transport.is_closing()
                    else 0
                ),
            }
            for stream in self.streams
        ]


class _Stream:
    """One browser's event stream: the newest unsent encoded event per kind, never more."""

    def __init__(self) -> None:
        self.pending: dict[str, bytes] = {}
        self.wake = asyncio.Event()
        self.closed = False
        self.transport: asyncio.BaseTransport | None = None

    def push(self, kind: str, message: bytes) -> None:
        self.pending[kind] = message  # replaces an unsent older state of the same kind
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


def _event(kind: str, data: object) -> bytes:
    return f"event: {kind}\ndata: {to_json(data)}\n\n".encode()
