"""The web viewer over real HTTP: renderings, strict validation of names/indices, live events."""

from __future__ import annotations

import http.client
import io
import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pn2v_live.core.context import Context
from pn2v_live.errors import UserError
from pn2v_live.service.viewer import ViewerServer
from pn2v_live.service.viewer_render import contrast_limits, downsample, render, to_uint8
from pn2v_live.storage.store import Store

FRAME_SHAPE = (48, 80)


def test_downsample_is_the_block_mean() -> None:
    frame = np.arange(16, dtype=np.float32).reshape(4, 4)
    expected = frame.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(downsample(frame, 2), expected)
    assert downsample(frame, 10).shape == (4, 4)  # never upsampled


def test_contrast_window_maps_linearly_to_8_bit() -> None:
    np.testing.assert_array_equal(
        to_uint8(np.array([[-3, 0, 5, 10, 20]]), 0, 10), [[0, 0, 128, 255, 255]]
    )
    assert contrast_limits(np.arange(101.0), 1, 99) == (1.0, 99.0)
    assert contrast_limits(np.full((8, 8), 7.0)) == (7.0, 8.0)  # flat frame: still a window


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_render_keeps_aspect_within_max_size(fmt: str) -> None:
    image = Image.open(
        io.BytesIO(render(np.random.default_rng(0).random((300, 500)), 0, 1, 100, fmt))
    )
    assert image.format == fmt.upper() and image.size == (100, 60)


def frame_at(t: int) -> np.ndarray:
    """A uint16 test frame whose content depends on t (a bright bar moving right)."""
    frame = np.full(FRAME_SHAPE, 100, np.uint16)
    frame[10:30, 2 * t : 2 * t + 6] = 1000
    return frame


@pytest.fixture()
def viewer(tmp_path: Path):
    store = Store(tmp_path / "store")
    acquisition = store.create("live01", FRAME_SHAPE, "uint16")
    for t in range(3):
        acquisition.write_raw(t, frame_at(t))
    status = {
        "model_version": 2,
        "model_source": "pn2v",
        "backlog": 1,
        "loss_history": [{"round": 1, "training_loss": float("nan"), "validation_loss": 2.5}],
    }
    server = ViewerServer(store, "127.0.0.1:0", status=lambda: status, poll_seconds=0.05)
    server.start()
    yield server, acquisition
    server.stop()
    store.close()


def get(server: ViewerServer, path: str) -> tuple[int, dict, bytes]:
    """GET `path` exactly as written (no client-side normalisation of '..' or %2F)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    connection.close()
    return result


def test_acquisition_list_counts_frames_and_lag(viewer) -> None:
    server, acquisition = viewer
    acquisition.write_denoised(1, frame_at(1).astype(np.float32), model_version=2)
    status, _, body = get(server, "/api/acquisitions")
    assert status == 200
    [summary] = json.loads(body)
    assert summary["name"] == "live01" and summary["shape"] == list(FRAME_SHAPE)
    assert (summary["frames"], summary["denoised"], summary["lag"]) == (3, 1, 2)
    status = json.loads(get(server, "/api/status")[2])  # strict JSON: a NaN loss is null
    assert status["model_version"] == 2 and status["loss_history"][0]["training_loss"] is None


def test_rendering_is_the_contrast_window_of_the_stored_frame(viewer) -> None:
    server, _ = viewer
    status, headers, body = get(server, "/api/acquisitions/live01/raw/2?lo=100&hi=1000")
    assert status == 200 and headers["Content-Type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(body)))
    expected = np.rint((frame_at(2).astype(float) - 100) * 255 / 900).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)
    status, _, body = get(server, "/api/acquisitions/live01/raw/0?max=40&format=jpeg")
    assert status == 200 and Image.open(io.BytesIO(body)).size == (40, 24)


def test_denoised_frame_is_404_until_written_then_carries_its_model_version(viewer) -> None:
    server, acquisition = viewer
    assert get(server, "/api/acquisitions/live01/denoised/0")[0] == 404
    acquisition.write_denoised(
        0, np.full(FRAME_SHAPE, 7.5, np.float32), model_version=3, window=Context(2, 0)
    )
    status, headers, body = get(server, "/api/acquisitions/live01/denoised/0?lo=0&hi=15")
    assert status == 200 and headers["X-Model-Version"] == "3"
    assert headers["X-Context-Window"] == "2:0"  # a live twin: frames t−2 … t
    assert np.all(np.asarray(Image.open(io.BytesIO(body))) == 128)  # 7.5 of [0, 15]


def test_auto_contrast_limits_are_the_raw_percentiles(viewer) -> None:
    server, _ = viewer
    status, _, body = get(server, "/api/acquisitions/live01/limits?t=1&low=1&high=99")
    assert status == 200
    expected = np.percentile(frame_at(1), [1, 99])
    np.testing.assert_allclose([json.loads(body)["lo"], json.loads(body)["hi"]], expected)


@pytest.mark.parametrize(
    "path, code",
    [
        ("/api/acquisitions/nope/raw/0", 404),
        ("/api/acquisitions/../raw/0", 404),
        ("/api/acquisitions/..%2F..%2Fsecret.txt/raw/0", 404),
        ("/api/acquisitions/%2E%2E/raw/0", 404),
        ("/api/acquisitions/live01.ome.zarr/raw/0", 404),
        ("/static/..%2F..%2F..%2Fsecret.txt", 404),
        ("/static/../../secret.txt", 404),
        ("/static/viewer.py", 404),
        ("/static/%2Fetc%2Fpasswd", 404),
        ("/../secret.txt", 404),
        ("/api/acquisitions/live01/raw/3", 404),
        ("/api/acquisitions/live01/raw/-1", 404),
        ("/api/acquisitions/live01/raw/1e3", 404),
        ("/api/acquisitions/live01/other/0", 404),
        ("/api/acquisitions/live01/raw/0?c=1", 400),
        ("/api/acquisitions/live01/raw/0?z=-1", 400),
        ("/api/acquisitions/live01/raw/0?max=0", 400),
        ("/api/acquisitions/live01/raw/0?max=100000", 400),
        ("/api/acquisitions/live01/raw/0?format=bmp", 400),
        ("/api/acquisitions/live01/raw/0?lo=nan&hi=1", 400),
        ("/api/acquisitions/live01/raw/0?lo=5", 400),
        ("/api/acquisitions/live01/raw/0?lo=5&hi=5", 400),
        ("/api/acquisitions/live01/limits?t=9", 404),
        ("/api/acquisitions/live01/limits?t=0&low=50&high=10", 400),
    ],
)
def test_bad_requests_are_refused_and_never_read_outside_the_store(viewer, path, code) -> None:
    server, _ = viewer
    secret = server.store.root.parent / "secret.txt"
    secret.write_text("top secret")
    status, headers, body = get(server, path)
    assert status == code
    assert b"top secret" not in body
    assert headers["Content-Type"].startswith("application/json") or status == 404


def test_page_and_its_files_are_served(viewer) -> None:
    server, _ = viewer
    status, headers, body = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/static/viewer.js"' in body
    for name in ("viewer.js", "viewer.css"):
        assert get(server, f"/static/{name}")[0] == 200


def read_event(stream) -> tuple[str, dict]:
    """The next server-sent event (skipping heartbeats) as (event name, data)."""
    kind, data = None, None
    while True:
        line = stream.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
        elif line == "" and kind is not None:
            return kind, data


def test_events_push_a_newly_written_frame(viewer) -> None:
    server, acquisition = viewer
    stream = urllib.request.urlopen(f"{server.url}api/events", timeout=10)
    assert stream.headers["Content-Type"] == "text/event-stream"
    first = dict([read_event(stream), read_event(stream)])
    assert first["acquisitions"][0]["frames"] == 3 and first["status"]["model_version"] == 2
    threading.Timer(0.2, acquisition.write_raw, (3, frame_at(3))).start()
    while (event := read_event(stream))[0] != "acquisitions" or event[1][0]["frames"] == 3:
        pass  # the stream times out (10 s) if the new frame is never pushed
    assert event[1][0]["frames"] == 4 and event[1][0]["lag"] == 4
    stream.close()


def test_address_in_use_is_a_clear_user_error(viewer) -> None:
    server, _ = viewer
    second = ViewerServer(server.store, f"127.0.0.1:{server.port}")
    with pytest.raises(UserError, match="viewer cannot listen on 127.0.0.1"):
        second.start()
    with pytest.raises(UserError, match="host:port"):
        ViewerServer(server.store, "8080")


def test_finished_acquisition_summary_updates_when_a_late_frame_arrives(viewer) -> None:
    server, acquisition = viewer
    for t in range(3):
        acquisition.write_denoised(t, frame_at(t).astype(np.float32), model_version=1)
    acquisition.close()
    [summary] = json.loads(get(server, "/api/acquisitions")[2])
    assert (summary["frames"], summary["lag"], summary["closed"]) == (3, 0, True)
    acquisition.write_raw(3, frame_at(3))  # a late frame after the end marker is still stored
    [summary] = json.loads(get(server, "/api/acquisitions")[2])
    assert (summary["frames"], summary["denoised"], summary["lag"]) == (4, 3, 1)
