"""The live web viewer: an aiohttp app the daemon serves in a background thread (own event loop).

Endpoints (all read-only; acquisition names must be ones the store lists, indices must be stored):

- `GET /`, `GET /static/{file}`: the page (a fixed set of packaged files, nothing else).
- `GET /api/acquisitions`: summaries (frames, denoised, lag, closed, shape, dtype, sizes).
- `GET /api/status`: the daemon's status (model version and source, backlog, loss history).
- `GET /api/acquisitions/{name}/limits?t=&c=&z=&low=&high=`: auto-contrast window (ADU) from the
  raw frame's percentiles, so both panels share it.
- `GET /api/acquisitions/{name}/{raw|denoised}/{t}?c=&z=&lo=&hi=&max=&format=`: an 8-bit
  rendering, downsampled so its longer side is at most `max` pixels; header `X-Model-Version`.
- `GET /api/events`: server-sent events `acquisitions` and `status`, pushed when the store or
  the status changes (the server polls the store; browsers never poll per frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

from aiohttp import web

from pn2v_live.errors import UserError
from pn2v_live.service.viewer_render import FORMATS, contrast_limits, render
from pn2v_live.storage.store import Acquisition, Store

log = logging.getLogger(__name__)

STATIC_FILES = {
    "index.html": "text/html",
    "viewer.js": "text/javascript",
    "viewer.css": "text/css",
}
MAX_RENDER_SIZE = 8192
HEARTBEAT_SECONDS = 15.0
# The store holds one plane per frame (axes t, c, z, y, x with c = z = 1); the page shows c/z
# selectors only for sizes above 1.
PLANE_SIZES = {"c": 1, "z": 1}


def parse_bind(bind: str) -> tuple[str, int]:
    """'host:port' (IPv6 as '[::1]:8080') → (host, port)."""
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"viewer bind {bind!r} is not host:port, e.g. 127.0.0.1:8080")
    return host.strip("[]"), int(port)


def to_json(data: object) -> str:
    """JSON a browser can parse: NaN and ±inf (e.g. a diverged loss) become null."""

    def finite(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data))


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _not_found(message: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")


def _int_query(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    text = request.query.get(key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise _bad_request(f"{key}={text!r} must be an integer in [{low}, {high}]")
    return int(text)


def _float_query(request: web.Request, key: str) -> float | None:
    text = request.query.get(key)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _bad_request(f"{key}={text!r} must be a finite number")
    return value


def acquisition_summary(acquisition: Acquisition) -> dict:
    """What the acquisition list and the live updates show about one acquisition."""
    stored = acquisition.frame_count
    waiting = len(acquisition.frames_without_twin())
    return {
        "name": acquisition.name,
        "frames": acquisition.valid_t,
        "denoised": stored - waiting,
        "lag": waiting,
        "closed": bool(acquisition.closed),
        "shape": list(acquisition.frame_shape),
        "dtype": str(acquisition.dtype),
        "sizes": dict(PLANE_SIZES),
    }


class ViewerServer:
    """Serves the viewer for `store` on `bind` ('host:port'; port 0 picks a free one).

    `status()` is called from the viewer thread and returns a JSON-able dict such as
    {"model_version", "model_source", "backlog", "loss_history": [{"round", "time",
    "training_loss", "validation_loss"}, ...]}.
    """

    def __init__(
        self,
        store: Store,
        bind: str = "127.0.0.1:8080",
        status: Callable[[], dict] | None = None,
        poll_seconds: float = 0.25,
    ) -> None:
        self.store = store
        self.host, self.port = parse_bind(bind)
        self.status = status or dict
        self.poll_seconds = poll_seconds
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="viewer-render")
        self._clients: set[asyncio.Queue] = set()
        self._finished: dict[str, dict] = {}  # summaries of complete acquisitions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    # ---- lifecycle (called from the daemon's thread) ------------------------------------

    def start(self) -> None:
        """Bind and serve in a background thread; raises UserError if the address is taken."""
        self._thread = threading.Thread(target=self._serve, name="viewer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise UserError(
                f"viewer cannot listen on {self.host}:{self.port}: {self._start_error}; "
                "choose another [viewer] bind or stop the program using it"
            ) from self._start_error
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
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/static/{file}", self._static)
        app.router.add_get("/api/status", self._status)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/api/acquisitions", self._acquisitions)
        app.router.add_get("/api/acquisitions/{name}/limits", self._limits)
        app.router.add_get(r"/api/acquisitions/{name}/{kind:raw|denoised}/{t}", self._frame)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _shutdown(self) -> None:
        self._watcher.cancel()
        for queue in self._clients:
            queue.put_nowait(None)
        await self._runner.cleanup()

    # ---- request helpers -----------------------------------------------------------------

    def _acquisition(self, request: web.Request) -> Acquisition:
        """The acquisition named in the URL; only names the store lists are accepted."""
        name = request.match_info["name"]
        if name not in self.store.acquisitions():
            raise _not_found(f"no acquisition named {name!r}")
        return self.store.acquisition(name)

    def _frame_index(self, request: web.Request, acquisition: Acquisition, text: str) -> int:
        if not text.isdigit() or int(text) >= acquisition.valid_t:
            raise _not_found(
                f"frame {text!r} is not stored in {acquisition.name!r} "
                f"({acquisition.valid_t} frames)"
            )
        return int(text)

    @staticmethod
    def _check_plane(request: web.Request) -> None:
        """Refuse c/z indices outside the plane sizes (400)."""
        for axis, size in PLANE_SIZES.items():
            _int_query(request, axis, 0, 0, size - 1)

    async def _in_thread(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # ---- handlers ------------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        return self._static_file("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name not in STATIC_FILES:
            raise _not_found(f"no static file {name!r}")
        return self._static_file(name)

    @staticmethod
    def _static_file(name: str) -> web.Response:
        text = resources.files("pn2v_live.service").joinpath("viewer_static", name).read_text()
        return web.Response(text=text, content_type=STATIC_FILES[name])

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._in_thread(self.status), dumps=to_json)

    async def _acquisitions(self, request: web.Request) -> web.Response:
        return web.json_response(await self._in_thread(self._summaries), dumps=to_json)

    def _summaries(self) -> list[dict]:
        """Summaries of every acquisition; one that was complete (closed, every frame denoised)
        and has not grown is not re-counted, so a store of many old acquisitions stays cheap."""
        summaries = []
        for acquisition in self.store.open_acquisitions():
            name = acquisition.name
            cached = self._finished.get(name)
            if cached is None or cached["frames"] != acquisition.valid_t:
                cached = acquisition_summary(acquisition)
                if cached["closed"] and cached["lag"] == 0:
                    self._finished[name] = cached
            summaries.append(cached)
        return summaries

    async def _limits(self, request: web.Request) -> web.Response:
        acquisition = self._acquisition(request)
        t = self._frame_index(request, acquisition, request.query.get("t", ""))
        self._check_plane(request)
        low = _float_query(request, "low")
        high = _float_query(request, "high")
        low, high = (0.5 if low is None else low), (99.8 if high is None else high)
        if not 0 <= low < high <= 100:
            raise _bad_request(f"percentiles low={low}, high={high} need 0 <= low < high <= 100")
        lo, hi = await self._in_thread(lambda: contrast_limits(acquisition.read_raw(t), low, high))
        return web.json_response({"lo": lo, "hi": hi})

    async def _frame(self, request: web.Request) -> web.Response:
        acquisition = self._acquisition(request)
        kind = request.match_info["kind"]
        t = self._frame_index(request, acquisition, request.match_info["t"])
        self._check_plane(request)
        max_size = _int_query(request, "max", 1024, 16, MAX_RENDER_SIZE)
        fmt = request.query.get("format", "png")
        if fmt not in FORMATS:
            raise _bad_request(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
        lo, hi = _float_query(request, "lo"), _float_query(request, "hi")
        if (lo is None) != (hi is None) or (lo is not None and hi <= lo):
            raise _bad_request("give both lo and hi with lo < hi, or neither for auto contrast")

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
            raise _not_found(f"frame {t} of {acquisition.name!r} has no denoised twin yet")
        body, headers = drawn
        return web.Response(body=body, content_type=FORMATS[fmt], headers=headers)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        queue.put_nowait(("acquisitions", await self._in_thread(self._summaries)))
        queue.put_nowait(("status", await self._in_thread(self.status)))
        self._clients.add(queue)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
                if event is None:
                    break
                kind, data = event
                await response.write(f"event: {kind}\ndata: {to_json(data)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(queue)
        return response

    async def _watch(self) -> None:
        """Push `acquisitions`/`status` events to every browser when what they show changes."""
        last: dict[str, object] = {}
        while True:
            await asyncio.sleep(self.poll_seconds)
            if not self._clients:
                last.clear()
                continue
            try:
                current = {
                    "acquisitions": await self._in_thread(self._summaries),
                    "status": await self._in_thread(self.status),
                }
            except Exception:  # a half-written acquisition must not end live updates
                log.exception("viewer could not read the store; retrying")
                continue
            for kind, data in current.items():
                if last.get(kind) != data:
                    for queue in self._clients:
                        queue.put_nowait((kind, data))
            last = current
