"""The viewer's limits over real sockets: capped connections and event streams, bounded queues,
Host/Origin names, the access token, and 2,000 event-stream attempts under an open-file limit."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_ROOT, require

from pn2v_live.errors import UserError
from pn2v_live.service.viewer import TOKEN_COOKIE, ViewerServer
from pn2v_live.storage.store import Store

TOKEN = "s3cret-token-for-the-viewer-tests"


@pytest.fixture()
def store(tmp_path: Path):
    store = Store(tmp_path / "store")
    acquisition = store.create("live01", (32, 48), "uint16")
    for t in range(3):
        acquisition.write_raw(t, np.full((32, 48), 100 + t, np.uint16))
    yield store
    store.close()


def serve(store: Store, bind: str = "127.0.0.1:0", **options) -> ViewerServer:
    options.setdefault("poll_seconds", 0.05)
    server = ViewerServer(store, bind, status=lambda: {"model_version": 1}, **options)
    server.start()
    return server


def get(
    port: int, path: str, headers: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> tuple[int, dict, bytes]:
    """GET `path` on 127.0.0.1:port with exactly these headers (Host defaults to 127.0.0.1)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    headers = dict(headers or {})
    connection.putrequest("GET", path, skip_host="Host" in headers)
    for key, value in headers.items():
        if value is not None:
            connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def open_stream(port: int) -> socket.socket:
    """An event-stream request on a raw socket; the caller decides whether to read."""
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return client


def status_line(client: socket.socket) -> int:
    line = client.makefile("rb").readline()
    return int(line.split()[1])


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# ---- numbers in URLs ------------------------------------------------------------------------

SUPERSCRIPT_TWO = "%C2%B2"  # '²': str.isdigit() says yes, int() refuses (was a 500)
ARABIC_INDIC_ONE = "%D9%A1"  # '١': int() reads it as 1 (was served as frame 1)
HUGE = "9" * 5000  # past int()'s 4,300-digit limit (was a 500)


@pytest.mark.parametrize(
    "path, code",
    [
        (f"/api/acquisitions/live01/raw/{SUPERSCRIPT_TWO}", 404),
        (f"/api/acquisitions/live01/raw/{ARABIC_INDIC_ONE}", 404),
        (f"/api/acquisitions/live01/denoised/{ARABIC_INDIC_ONE}", 404),
        (f"/api/acquisitions/live01/raw/{HUGE}", 404),
        ("/api/acquisitions/live01/raw/-1", 404),
        ("/api/acquisitions/live01/raw/1_0", 404),
        ("/api/acquisitions/live01/raw/+1", 404),
        ("/api/acquisitions/live01/raw/%201", 404),
        (f"/api/acquisitions/live01/limits?t={ARABIC_INDIC_ONE}", 404),
        (f"/api/acquisitions/live01/limits?t={SUPERSCRIPT_TWO}", 404),
        (f"/api/acquisitions/live01/limits?t={HUGE}", 404),
        ("/api/acquisitions/live01/limits?t=-1", 404),
        (f"/api/acquisitions/live01/limits?t=0&low={ARABIC_INDIC_ONE}", 400),
        ("/api/acquisitions/live01/limits?t=0&high=9_9", 400),
        (f"/api/acquisitions/live01/raw/0?max={ARABIC_INDIC_ONE}00", 400),
        (f"/api/acquisitions/live01/raw/0?max={SUPERSCRIPT_TWO}", 400),
        (f"/api/acquisitions/live01/raw/0?max={HUGE}", 400),
        ("/api/acquisitions/live01/raw/0?max=-100", 400),
        (f"/api/acquisitions/live01/raw/0?c={ARABIC_INDIC_ONE}", 400),
        ("/api/acquisitions/live01/raw/0?z=-0", 400),
        (f"/api/acquisitions/live01/raw/0?lo={ARABIC_INDIC_ONE}&hi=9", 400),
        (f"/api/acquisitions/live01/raw/0?lo=0&hi={HUGE}", 400),
        ("/api/acquisitions/live01/raw/0?lo=0&hi=infinity", 400),
        ("/api/acquisitions/live01/raw/0?lo=0&hi=1_000", 400),
    ],
)
def test_numbers_in_urls_are_ascii_decimal_or_refused(store, path, code) -> None:
    server = serve(store)
    try:
        status, headers, body = get(server.port, path)
        assert status == code, body[:300]
        assert headers["Content-Type"].startswith("application/json")
        assert len(body) < 1000  # the error names the value without echoing 5,000 digits
    finally:
        server.stop()


def test_ascii_numbers_still_work(store) -> None:
    server = serve(store)
    try:
        assert get(server.port, "/api/acquisitions/live01/raw/1?max=20&lo=-5&hi=1e3")[0] == 200
        assert get(server.port, "/api/acquisitions/live01/limits?t=2&low=.5&high=99.")[0] == 200
    finally:
        server.stop()


# ---- Host and Origin (DNS rebinding) ------------------------------------------------------


def test_only_requests_naming_this_server_are_answered(store) -> None:
    server = serve(store, allowed_hosts=["scope-pc.lab.example.org"])
    port = server.port
    try:
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            "LOCALHOST.",
            f"[::1]:{port}",
            "scope-pc.lab.example.org",
        ):
            assert get(port, "/api/acquisitions", {"Host": host})[0] == 200, host
        for host in (
            f"attacker.example:{port}",
            "attacker.example",
            "127.0.0.1.nip.io",
            "10.1.2.3",
        ):
            status, _, body = get(port, "/api/acquisitions", {"Host": host})
            assert status == 421 and b"live01" not in body, host
        assert get(port, "/", {"Host": None})[0] == 400  # no Host header at all
        assert get(port, "/", {"Host": "a b"})[0] == 421
        ok = {"Origin": f"http://127.0.0.1:{port}"}
        assert get(port, "/api/acquisitions", ok)[0] == 200
        for origin in ("http://attacker.example", "null", "http://attacker.example:8080"):
            status, _, body = get(port, "/api/acquisitions", {"Origin": origin})
            assert status == 403 and b"live01" not in body, origin
    finally:
        server.stop()


# ---- beyond loopback: warning and token -----------------------------------------------------


def test_beyond_loopback_needs_a_token_and_warns(store, caplog) -> None:
    with pytest.raises(UserError, match="viewer.token: required .* 0.0.0.0"):
        ViewerServer(store, "0.0.0.0:0").start()

    with caplog.at_level(logging.WARNING, logger="pn2v_live.service.viewer"):
        server = serve(store, "0.0.0.0:0", token=TOKEN)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("viewer listens beyond loopback on 0.0.0.0" in w for w in warnings), warnings
        port = server.port
        for path in ("/", "/static/viewer.js", "/api/acquisitions", "/api/events"):
            status, headers, body = get(port, path)
            assert status == 401 and b"live01" not in body, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert get(port, "/api/acquisitions", {"Authorization": "Bearer wrong"})[0] == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = get(port, "/api/acquisitions", bearer)
        assert status == 200 and json.loads(body)[0]["name"] == "live01"
        assert get(port, "/api/acquisitions/live01/raw/0", bearer)[0] == 200

        # A browser opens the page from a link with ?token=: a cookie, and the token leaves the
        # address bar; then the page, its files and its event stream work with the cookie.
        status, headers, _ = get(port, f"/?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"{TOKEN_COOKIE}={TOKEN}") and "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        with_cookie = {"Cookie": f"{TOKEN_COOKIE}={TOKEN}"}
        assert get(port, "/", with_cookie)[0] == 200
        assert get(port, "/api/status", with_cookie)[0] == 200
        assert get(port, "/", {"Cookie": f"{TOKEN_COOKIE}=wrong"})[0] == 401
        # The Host check still applies with a valid token.
        assert get(port, "/", {**bearer, "Host": "attacker.example"})[0] == 421

        address = non_loopback_address()
        if address is not None:  # the machine's own address, as a colleague's browser uses it
            assert get(port, "/api/acquisitions", host=address)[0] == 401
            assert get(port, "/api/acquisitions", bearer, host=address)[0] == 200
    finally:
        server.stop()


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_a_token_on_loopback_is_required_too(store) -> None:
    server = serve(store, token=TOKEN)
    try:
        assert get(server.port, "/api/acquisitions")[0] == 401
        assert get(server.port, "/api/acquisitions", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    finally:
        server.stop()


# ---- caps and bounded queues ----------------------------------------------------------------


def test_event_streams_past_the_cap_get_503_and_a_freed_slot_is_reused(store) -> None:
    server = serve(store, max_streams=2, max_connections=8)
    try:
        streams = [open_stream(server.port) for _ in range(2)]
        assert [status_line(s) for s in streams] == [200, 200]
        status, headers, body = get(server.port, "/api/events")
        assert status == 503 and "max_streams" in json.loads(body)["error"]
        assert headers["Connection"] == "close" and headers["Retry-After"]
        assert get(server.port, "/api/acquisitions")[0] == 200  # everything else still works
        streams.pop().close()  # the browser tab closes: its slot is free at once
        wait_for(lambda: len(server.stream_stats()) == 1, what="the closed stream to end")
        replacement = open_stream(server.port)
        assert status_line(replacement) == 200
        for client in [*streams, replacement]:
            client.close()
    finally:
        server.stop()


def test_connections_past_the_cap_get_503_before_any_request(store) -> None:
    server = serve(store, max_streams=1, max_connections=4)
    try:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        wait_for(lambda: len(server._runner.server.connections) == 4, what="4 connections")
        status, headers, body = get(server.port, "/api/acquisitions")
        assert status == 503 and "max_connections" in json.loads(body)["error"]
        assert server.refused_connections >= 1
        for client in idle:
            client.close()
        wait_for(lambda: get(server.port, "/api/acquisitions")[0] == 200, what="a free slot")
    finally:
        server.stop()


def big_changing_status() -> tuple[Callable[[], dict], dict[str, int], int]:
    """A status of about 300 kB of JSON that differs at every call; its call count; its size."""
    big = {"loss_history": [{"round": r, "validation_loss": r / 7} for r in range(6000)]}
    calls = {"n": 0}

    def status() -> dict:
        calls["n"] += 1
        return {**big, "backlog": calls["n"]}

    return status, calls, len(json.dumps(status()))


def never_reading_client(port: int) -> socket.socket:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return client


def test_a_client_that_never_reads_holds_bounded_memory(store) -> None:
    status, calls, message_bytes = big_changing_status()
    server = ViewerServer(store, "127.0.0.1:0", status=status, poll_seconds=0.02)
    server.start()
    client = never_reading_client(server.port)
    try:
        wait_for(lambda: calls["n"] > 40, what="40 status changes")  # ≥ 12 MB of events
        for _ in range(3):  # whenever one looks
            [stats] = server.stream_stats()
            assert stats["pending_events"] <= 2, stats  # newest acquisitions + newest status
            assert stats["pending_bytes"] <= 2 * message_bytes + 4096, stats
            # User-space socket buffer: the write-buffer limit (64 kB) plus one message.
            assert stats["buffered_bytes"] <= 64 * 1024 + 2 * message_bytes, stats
            produced = (calls["n"] - 1) * message_bytes
            assert stats["pending_bytes"] + stats["buffered_bytes"] < produced / 10
            time.sleep(0.2)
    finally:
        client.close()
        server.stop()


def test_a_client_stuck_for_stalled_seconds_is_dropped(store) -> None:
    status, _, _ = big_changing_status()
    server = ViewerServer(store, "127.0.0.1:0", status=status, poll_seconds=0.02)
    server.stalled_seconds = 0.5
    server.start()
    client = never_reading_client(server.port)
    try:
        wait_for(lambda: server.stream_stats() != [], what="the stream to open")
        wait_for(lambda: server.stream_stats() == [], what="the stalled stream to be dropped")
        client.settimeout(5)  # and its connection is closed (reset: unsent data was discarded)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(1 << 16):
                pass
    finally:
        client.close()
        server.stop()


# ---- 2,000 event-stream attempts under an open-file limit ----------------------------------

# The real viewer in a process with the open-file limit set, which meanwhile keeps storing raw
# frames and their "denoised" twins in the store (every store write opens files, as the
# daemon's ingest and inference do) and reports what failed.
VIEWER_PROCESS = """
import json, os, resource, sys, threading, time
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
import numpy as np
from pn2v_live.service.viewer import ViewerServer
from pn2v_live.storage.store import Store

store = Store(sys.argv[1])
acquisition = store.create("live01", (64, 64), "uint16")
server = ViewerServer(store, "127.0.0.1:0", status=lambda: {"model_version": 1},
                      poll_seconds=0.1)
server.start()
done = threading.Event()
report = {"frames": 0, "errors": [], "max_open_files": 0}

def write_frames():
    t = 0
    while not done.is_set():
        try:
            frame = np.full((64, 64), t % 1000, np.uint16)
            acquisition.write_raw(t, frame)
            acquisition.write_denoised(t, frame.astype(np.float32), model_version=1)
            t += 1
            report["frames"] = t
        except Exception as error:
            report["errors"].append(repr(error))
        open_files = len(os.listdir("/proc/self/fd"))
        report["max_open_files"] = max(report["max_open_files"], open_files)
        time.sleep(0.01)

writer = threading.Thread(target=write_frames)
writer.start()
print(json.dumps({"port": server.port}), flush=True)
for line in sys.stdin:
    if line.strip() == "report":
        print(json.dumps({**report, "errors": report["errors"][:5]}), flush=True)
    elif line.strip() == "stop":
        break
done.set()
writer.join()
report.update(refused_connections=server.refused_connections,
              refused_streams=server.refused_streams, streams=len(server.stream_stats()))
server.stop()
store.close()
print(json.dumps({**report, "errors": report["errors"][:5]}), flush=True)
"""


def unit_open_file_limit() -> int:
    """LimitNOFILE= of the systemd unit (soft value)."""
    unit = (PROJECT_ROOT / "service" / "pn2v-live.service").read_text()
    match = re.search(r"^LimitNOFILE=(\d+)", unit, re.MULTILINE)
    assert match, "the unit sets no LimitNOFILE"
    return int(match.group(1))


def storm(port: int, attempts: int, timeout: float) -> tuple[dict[str, int], list]:
    """`attempts` event-stream requests at once; counts each one's HTTP status ('200', '503')
    or how it failed ('connect failed', 'reset', 'closed', 'unanswered'). The sockets are
    returned open (the accepted streams stay connected)."""
    selector = selectors.DefaultSelector()
    request = f"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    sockets = []
    for _ in range(attempts):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        selector.register(client, selectors.EVENT_WRITE, bytearray())
        sockets.append(client)
    outcome: dict[str, int] = {}

    def done(client: socket.socket, kind: str) -> None:
        outcome[kind] = outcome.get(kind, 0) + 1
        selector.unregister(client)

    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, events in selector.select(timeout=0.5):
            client, received = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                if client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    done(client, "connect failed")
                else:
                    client.send(request)
                    selector.modify(client, selectors.EVENT_READ, received)
                continue
            try:
                chunk = client.recv(4096)
            except ConnectionResetError:
                done(client, "reset")
                continue
            received += chunk
            if b"\r\n" in received:
                done(client, received.split()[1].decode())
            elif not chunk:
                done(client, "closed")
    if selector.get_map():
        outcome["unanswered"] = len(selector.get_map())
    selector.close()
    return outcome, sockets


@pytest.mark.parametrize("limit", ["unit", 1024])
def test_2000_event_stream_attempts_leave_the_server_storing_and_answering(
    tmp_path: Path, limit
) -> None:
    """1024 is the usual soft limit outside the unit (e.g. `pn2v-live serve` from a shell)."""
    limit = unit_open_file_limit() if limit == "unit" else limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    require(hard == resource.RLIM_INFINITY or hard >= 2300, f"open-file hard limit {hard} < 2300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2300), hard))
    process = subprocess.Popen(
        [sys.executable, "-c", VIEWER_PROCESS, str(tmp_path / "store"), str(limit)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    sockets = []
    try:
        port = json.loads(process.stdout.readline())["port"]

        def frames_stored() -> int:
            process.stdin.write("report\n")
            process.stdin.flush()
            return json.loads(process.stdout.readline())["frames"]

        wait_for(lambda: frames_stored() > 2, what="frames being stored")
        before = frames_stored()
        started = time.monotonic()
        outcome, sockets = storm(port, 2000, timeout=30)
        took = time.monotonic() - started
        # Every attempt is answered: at most max_streams (64) get their stream, the rest 503.
        assert set(outcome) <= {"200", "503"}, outcome
        assert sum(outcome.values()) == 2000 and 1 <= outcome.get("200", 0) <= 64, outcome
        # While the accepted streams are still open, the server answers and stores on.
        status, _, body = get(port, "/api/acquisitions")
        assert status == 200, body
        wait_for(lambda: frames_stored() > before + 2, what="frames stored after the storm")
        assert json.loads(get(port, "/api/acquisitions")[2])[0]["frames"] > before
    finally:
        for client in sockets:
            client.close()
        if process.poll() is None:
            process.stdin.write("stop\n")
            process.stdin.flush()
        out, err = process.communicate(timeout=30)
    report = json.loads(out.strip().splitlines()[-1])
    assert report["errors"] == [], report
    assert "Too many open files" not in err and "Traceback" not in err, err[-2000:]
    assert report["max_open_files"] < min(limit, 1024), report
    assert report["refused_connections"] + report["refused_streams"] >= 2000 - 64, report
    print(f"limit {limit}: {outcome} in {took:.1f} s; {report}")
