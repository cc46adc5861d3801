"""The live web viewer: an aiohttp app the daemon serves in a background thread (own event loop).

Endpoints (all read-only; acquisition names must be ones the store lists, indices must be stored):

- `GET /`, `GET /static/{file}`: the page (a fixed set of packaged files, nothing else).
- `GET /api/acquisitions`: summaries (frames, denoised, lag, closed, shape, dtype, sizes).
- `GET /api/status`: the daemon's status (model version and source, backlog, loss history, the
  inference and training devices with the torch build, shown in the page's header).
- `GET /api/acquisitions/{name}/limits?t=&c=&z=&low=&high=`: auto-contrast window (ADU) from the
  raw frame's percentiles, so both panels share it.
- `GET /api/acquisitions/{name}/{raw|denoised}/{t}?c=&z=&lo=&hi=&max=&format=`: an 8-bit
  rendering, downsampled so its longer side is at most `max` pixels; header `X-Model-Version`.
- `GET /api/events`: server-sent events `acquisitions` and `status`, pushed when the store or
  the status changes (the server polls the store; browsers never poll per frame).

Limits, so that no browser or script can exhaust the daemon (its open files above all):

- at most `max_connections` connections at once; one past that is answered 503 and closed at
  once, before its request is read; one that sends no request is closed after
  `IDLE_SECONDS`;
- at most `max_streams` event streams; one past that gets 503 with the reason;
- each stream keeps only the newest unsent state per event kind (a client that does not read
  holds two pending events at most, plus the socket's bounded write buffer) and is dropped when
  a write has not gone through for `STALLED_SECONDS`;
- every number in a path or query is ASCII decimal (`²`, `١`, `1_0`, a sign or 5,000 digits
  are 400/404, never read as a number);
- `Host` and `Origin` must name this server (421/403, see `access`), and with a token every
  request must carry it (401); beyond loopback a token is required.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from aiohttp import web

from pn2v_live.errors import UserError
from pn2v_live.service.access import (
    TOKEN_ADVICE,
    HostCheck,
    bearer_token,
    exposure_warning,
    is_loopback,
    parse_bind,
    token_matches,
)
from pn2v_live.service.acquisition_list import AcquisitionList
from pn2v_live.service.viewer_events import STALLED_SECONDS, LiveUpdates
from pn2v_live.service.viewer_listener import ViewerListener
from pn2v_live.service.viewer_render import FORMATS, contrast_limits, render
from pn2v_live.service.viewer_requests import (
    ascii_int,
    bad_request,
    error_response,
    float_query,
    int_query,
    not_found,
    shown,
    to_json,
)
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.store import Store
from pn2v_live.storage.summary import Summary

log = logging.getLogger(__name__)

STATIC_FILES = {
    "index.html": "text/html",
    "viewer.js": "text/javascript",
    "viewer.css": "text/css",
}
MAX_RENDER_SIZE = 8192
IDLE_SECONDS = 15.0  # a connection with no request in progress is closed after this long
TOKEN_COOKIE = "pn2v_live_viewer_token"
# The store holds one plane per frame (axes t, c, z, y, x with c = z = 1); the page shows c/z
# selectors only for sizes above 1.
PLANE_SIZES = {"c": 1, "z": 1}


def acquisition_summary(summary: Summary) -> dict:
    """What the acquisition list and the live updates show about one acquisition."""
    return {
        "name": summary.name,
        "frames": summary.valid_t,
        "denoised": summary.denoised,
        "lag": summary.untwinned,
        "closed": summary.closed,
        "shape": list(summary.frame_shape),
        "dtype": summary.dtype,
        "sizes": dict(PLANE_SIZES),
    }


class ViewerServer:
    """Serves the viewer for `store` on `bind` ('host:port'; port 0 picks a free one).

    `status()` is called from the viewer thread and returns a JSON-able dict such as
    {"model_version", "model_source", "backlog", "loss_history": [{"round", "time",
    "training_loss", "validation_loss"}, ...]}.

    `token` (viewer.token), when not empty, is required of every request; it must be set when
    `bind` is beyond loopback. `allowed_hosts` adds names the Host/Origin check accepts.
    """

    def __init__(
        self,
        store: Store,
        bind: str = "127.0.0.1:8080",
        status: Callable[[], dict] | None = None,
        poll_seconds: float = 0.25,
        *,
        token: str = "",
        allowed_hosts: list[str] | tuple[str, ...] = (),
        max_streams: int = 64,
        max_connections: int = 256,
    ) -> None:
        self.store = store
        self.bind = bind
        self.host, self.port = parse_bind(bind, "viewer bind")
        self.status = status or dict
        self.poll_seconds = poll_seconds
        self.token = token
        self.allowed_hosts = tuple(allowed_hosts)
        self.max_streams = max_streams
        self.max_connections = max_connections
        self.stalled_seconds = STALLED_SECONDS
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="viewer-render")
        self._updates = LiveUpdates(self._state, max_streams, poll_seconds)
        self._list = AcquisitionList(store, acquisition_summary)  # opens no acquisition
        self._host_check: HostCheck | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._listener = ViewerListener(self.host, self.port, max_connections)
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def refused_streams(self) -> int:
        """Event streams answered 503 (max_streams reached)."""
        return self._updates.refused

    @property
    def refused_connections(self) -> int:
        """Connections answered 503 before their request was read."""
        return self._listener.refused

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def beyond_loopback(self) -> bool:
        return not is_loopback(self.host)

    # ---- lifecycle (called from the daemon's thread) ------------------------------------

    def start(self) -> None:
        """Bind and serve in a background thread; raises UserError if the address is taken or
        the bind is beyond loopback without a token."""
        if self.beyond_loopback and not self.token:
            raise UserError(
                f"viewer.token: required because viewer.bind {self.bind} listens beyond "
                f"loopback (anyone on the network could read the data); set a long random "
                f"token, {TOKEN_ADVICE}, or bind to 127.0.0.1"
            )
        self._host_check = HostCheck(self.host, self.allowed_hosts)
        self._thread = threading.Thread(target=self._serve, name="viewer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise UserError(
                f"viewer cannot listen on {self.host}:{self.port}: {self._start_error}; "
                "choose another [viewer] bind or stop the program using it"
            ) from self._start_error
        if self.beyond_loopback:
            log.warning(exposure_warning("viewer", self.bind, "viewer.token"))
        self._listener.check_open_file_limit()
        log.info("viewer at %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Close all connections and the listening socket; returns once the thread has ended."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stream_stats(self, timeout: float = 5.0) -> list[dict[str, int]]:
        """Per open event stream: events and bytes waiting to be written, and bytes in the
        socket's user-space write buffer (what a client that does not read costs)."""

        return asyncio.run_coroutine_threadsafe(self._updates.stats(), self._loop).result(timeout)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._open())
        except OSError as error:
            self._start_error = error
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _open(self) -> None:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{file}", self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/acquisitions", self._acquisitions)
        app.router.add_get("/api/acquisitions/{name}/limits", self._limits)
        app.router.add_get(r"/api/acquisitions/{name}/{kind:raw|denoised}/{t}", self._frame)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=IDLE_SECONDS,
            handler_cancellation=True,  # a stream whose browser went away ends at once
        )
        await self._runner.setup()
        try:
            self._listener.open(self._runner.server)
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._listener.port
        self._watcher = asyncio.get_running_loop().create_task(self._updates.watch())

    async def _shutdown(self) -> None:
        self._watcher.cancel()
        await self._listener.close()
        self._updates.close()
        await self._runner.cleanup()

    # ---- access: Host/Origin names and the token ---------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        refusal = self._host_check.refusal(
            request.headers.get("Host"),
            request.headers.get("Origin"),
            sockname[0] if sockname else None,
        )
        if refusal is not None:
            return error_response(*refusal)
        if not self.token:
            return await handler(request)
        if token_matches(bearer_token(request.headers.get("Authorization")), self.token):
            return await handler(request)
        if token_matches(request.cookies.get(TOKEN_COOKIE), self.token):
            return await handler(request)
        if token_matches(request.query.get("token"), self.token):
            # A link with ?token=: remember it in a cookie and, for the page, drop it from the
            # address bar (so it is not bookmarked, shared or shown over someone's shoulder).
            if request.path == "/":
                response: web.StreamResponse = web.Response(status=303, headers={"Location": "/"})
            else:
                response = await handler(request)
            response.set_cookie(
                TOKEN_COOKIE, self.token, httponly=True, samesite="Strict", path="/"
            )
            return response
        return error_response(
            401,
            "this viewer needs its access token (viewer.token): open the viewer's URL with "
            "?token=TOKEN once, or send the header 'Authorization: Bearer TOKEN'",
            **{"WWW-Authenticate": 'Bearer realm="pn2v-live viewer"'},
        )

    # ---- request helpers -----------------------------------------------------------------

    def _acquisition(self, request: web.Request) -> Acquisition:
        """The acquisition named in the URL; only names the store lists are accepted."""
        name = request.match_info["name"]
        if name not in self._list.names():
            raise not_found(f"no acquisition named {shown(name)}")
        return self.store.acquisition(name)

    def _frame_index(self, request: web.Request, acquisition: Acquisition, text: str) -> int:
        t = ascii_int(text)
        if t is None or t >= acquisition.valid_t:
            raise not_found(
                f"frame {shown(text)} is not stored in {acquisition.name!r} "
                f"({acquisition.valid_t} frames)"
            )
        return t

    @staticmethod
    def _check_plane(request: web.Request) -> None:
        """Refuse c/z indices outside the plane sizes (400)."""
        for axis, size in PLANE_SIZES.items():
            int_query(request, axis, 0, 0, size - 1)

    async def _in_thread(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # ---- handlers ------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return self._static_file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in STATIC_FILES:
            raise not_found(f"no static file {name!r}")
        return self._static_file(name)

    @staticmethod
    def _static_file(name: str) -> web.Response:
        text = resources.files("pn2v_live.service").joinpath("viewer_static", name).read_text()
        return web.Response(text=text, content_type=STATIC_FILES[name])

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._in_thread(self.status), dumps=to_json)

    async def _acquisitions(self, request: web.Request) -> web.Response:
        return web.json_response(await self._in_thread(self._list.summaries), dumps=to_json)

    async def _limits(self, request: web.Request) -> web.Response:
        acquisition = self._acquisition(request)
        t = self._frame_index(request, acquisition, request.query.get("t", ""))
        self._check_plane(request)
        low = float_query(request, "low")
        high = float_query(request, "high")
        low, high = (0.5 if low is None else low), (99.8 if high is None else high)
        if not 0 <= low < high <= 100:
            raise bad_request(f"percentiles low={low}, high={high} need 0 <= low < high <= 100")
        lo, hi = await self._in_thread(lambda: contrast_limits(acquisition.read_raw(t), low, high))
        return web.json_response({"lo": lo, "hi": hi})

    async def _frame(self, request: web.Request) -> web.Response:
        acquisition = self._acquisition(request)
        kind = request.match_info["kind"]
        t = self._frame_index(request, acquisition, request.match_info["t"])
        self._check_plane(request)
        max_size = int_query(request, "max", 1024, 16, MAX_RENDER_SIZE)
        fmt = request.query.get("format", "png")
        if fmt not in FORMATS:
            raise bad_request(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
        lo, hi = float_query(request, "lo"), float_query(request, "hi")
        if (lo is None) != (hi is None) or (lo is not None and hi <= lo):
            raise bad_request("give both lo and hi with lo < hi, or neither for auto contrast")

        def draw() -> tuple[bytes, dict[str, str]] | None:
            headers = {"Cache-Control": "no-store"}
            if kind == "raw":
                frame = acquisition.read_raw(t)
            else:
                frame = acquisition.read_denoised(t)
                if frame is None:
                    return None
                headers["X-Model-Version"] = str(acquisition.denoised_version(t))
                headers["X-Context-Window"] = str(acquisition.denoised_window(t))
            window = (lo, hi) if lo is not None else contrast_limits(acquisition.read_raw(t))
            return render(frame, *window, max_size, fmt), headers

        drawn = await self._in_thread(draw)
        if drawn is None:
            raise not_found(f"frame {t} of {acquisition.name!r} has no denoised twin yet")
        body, headers = drawn
        return web.Response(body=body, content_type=FORMATS[fmt], headers=headers)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        return await self._updates.handle(request, self.stalled_seconds)

    async def _state(self) -> dict[str, object]:
        """What the pages show: the acquisition list and the daemon's status."""
        return {
            "acquisitions": await self._in_thread(self._list.summaries),
            "status": await self._in_thread(self.status),
        }
