"""The Prometheus `/metrics` listener: prometheus-client's WSGI app behind the daemon's own
small threaded server, so that it checks Host/Origin and the token (`metrics.token`, sent by
Prometheus as `authorization: {credentials: TOKEN}`, i.e. `Authorization: Bearer TOKEN`) and
cannot be exhausted: at most MAX_CONNECTIONS at once (more get 503 and are closed), and a
connection that sends nothing for IDLE_SECONDS is closed.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

from pn2v_live.service.access import (
    HostCheck,
    bearer_token,
    exposure_warning,
    is_loopback,
    token_matches,
)

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 16  # a scrape needs one; a few people with curl a few more
IDLE_SECONDS = 10.0
_BUSY_BODY = b"metrics busy: too many connections at once; try again shortly\n"
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\nRetry-After: 5\r\nConnection: close\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Handler(WSGIRequestHandler):
    timeout = IDLE_SECONDS  # socket timeout: a silent client cannot hold its thread forever

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ["pn2v_live.local_address"] = self.connection.getsockname()[0]
        return environ

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False
    thread: threading.Thread | None = None  # its accept loop, watched by the health check

    def __init__(self, *args, **kwargs) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def guarded_app(app, host_check: HostCheck, token: str):
    """`app` answered only for requests naming this server and, with a token, carrying it."""

    def guarded(environ: dict, start_response):
        refusal = host_check.refusal(
            environ.get("HTTP_HOST"),
            environ.get("HTTP_ORIGIN"),
            environ.get("pn2v_live.local_address"),
        )
        offered = bearer_token(environ.get("HTTP_AUTHORIZATION"))
        if refusal is None and token and not token_matches(offered, token):
            refusal = 401, "send metrics.token as 'Authorization: Bearer TOKEN'"
        if refusal is None:
            return app(environ, start_response)
        status, reason = refusal
        body = f"{reason}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Bearer realm="pn2v-live metrics"'))
        start_response(f"{status} {_REASONS[status]}", headers)
        return [body]

    return guarded


_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 421: "Misdirected Request"}


def start_metrics_server(
    host: str, port: int, token: str = "", allowed_hosts: list[str] | tuple[str, ...] = ()
) -> WSGIServer:
    """Serve the default registry on host:port in a daemon thread (`server.thread`); raises
    OSError if it cannot listen. Logs a WARNING when the address is beyond loopback.
    `server.shutdown()` then `server.server_close()` stop it."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family

    app = guarded_app(make_wsgi_app(REGISTRY), HostCheck(host, allowed_hosts), token)
    server = make_server(sockaddr[0], port, app, Server, handler_class=_Handler)
    server.thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    server.thread.start()
    if not is_loopback(host):
        shown = f"[{host}]" if ":" in host else host
        log.warning(exposure_warning("metrics", f"{shown}:{server.server_port}", "metrics.token"))
    return server
