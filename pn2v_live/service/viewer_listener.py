"""The viewer's listening sockets, with the open sockets bounded whatever clients do.

Connections are accepted one by one: up to `max_connections` are handed to the HTTP server,
up to as many more are answered 503 at once and closed (`_Refusal`), and while all refusal
slots are taken nothing is accepted (the kernel queues new connections, then makes their
clients retry) instead of opening ever more sockets.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import socket

log = logging.getLogger("pn2v_live.service.viewer")  # the viewer's log lines

# Connections the kernel queues for us (they hold no open file until accepted, one at a time):
# a burst of new connections waits there instead of being dropped and retried seconds later.
LISTEN_BACKLOG = 1024
REFUSAL_SECONDS = 1.0  # a refused connection that sends no request is closed after this long
RESERVED_FILES = 256  # open files the rest of the daemon needs beside the viewer's connections


class ViewerListener:
    """Listens on `host`:`port` (port 0: a free one, `port` once open) for an HTTP server;
    `refused` counts the connections answered 503 before their request was read."""

    def __init__(self, host: str, port: int, max_connections: int) -> None:
        self.host, self.port, self.max_connections = host, port, max_connections
        self.refused = 0
        self._busy_response = _busy_response(max_connections)
        self._slots: asyncio.Semaphore | None = None  # 503s being sent, at most
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task] = []

    def open(self, http: asyncio.Protocol) -> None:
        """Bind (OSError when an address cannot be bound) and accept connections for `http`,
        the server's protocol factory, on the running event loop."""
        self._sockets = listening_sockets(self.host, self.port)
        self.port = self._sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.max_connections)
        self._accepting = [loop.create_task(self._accept(sock, http)) for sock in self._sockets]

    async def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections are the server's)."""
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._sockets:
            sock.close()

    def check_open_file_limit(self) -> None:
        """Warn when the worst case of open sockets does not fit the process's limit."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = 2 * self.max_connections + RESERVED_FILES  # served + being refused (_accept)
        if soft != resource.RLIM_INFINITY and soft < needed:
            log.warning(
                "the open-file limit (%d) is below what viewer.max_connections = %d may need "
                "with the rest of the daemon (about %d): lower viewer.max_connections or raise "
                "the limit (LimitNOFILE= in the systemd unit, ulimit -n)",
                soft,
                self.max_connections,
                needed,
            )

    async def _accept(self, listener: socket.socket, http) -> None:
        """Accept connections one by one (module docstring)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a slot in case this one must be refused
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as error:  # e.g. the process is at its open-file limit: let it be
                self._slots.release()
                log.warning("viewer cannot accept a connection (%s); retrying in 1 s", error)
                await asyncio.sleep(1.0)
                continue
            refusal = None if len(http.connections) < self.max_connections else _Refusal(self)
            if refusal is None:
                self._slots.release()
            try:
                factory = http if refusal is None else functools.partial(_same, refusal)
                await loop.connect_accepted_socket(factory, client)
            except OSError:  # the client is gone already
                client.close()
                if refusal is not None and refusal.transport is None:
                    self._slots.release()


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets on every address `host` resolves to (as asyncio's
    create_server binds them), all on one port; OSError if any cannot be bound."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = dict.fromkeys((family, address[:2]) for family, _, _, _, address in infos)
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            if sockets:  # with port 0 the others take the port the first one got
                address = (address[0], sockets[0].getsockname()[1])
            sock = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
            sock.setblocking(False)
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _busy_response(max_connections: int) -> bytes:
    """The whole 503 answer to a connection past `max_connections`."""
    body = json.dumps(
        {
            "error": f"the viewer is busy ({max_connections} connections, "
            "viewer.max_connections); try again shortly"
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _same(protocol: asyncio.Protocol) -> asyncio.Protocol:
    return protocol


class _Refusal(asyncio.Protocol):
    """A connection past `max_connections`: 503 at once, never parsed, closed once the request
    has come in (closing before would make the kernel answer the request with a reset, which
    can destroy the 503 before the client reads it) or after REFUSAL_SECONDS."""

    def __init__(self, listener: ViewerListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.listener.refused += 1
        transport.write(self.listener._busy_response)
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener._slots.release()
        if self.timer is not None:
            self.timer.cancel()
