"""The viewer's acquisition list over a store of hundreds of acquisitions, in the real server: it
shows every one with its counts without opening them, keeps them current as frames are stored
and denoised, and the acquisitions open in the daemon stay bounded however many a page selects.
"""

from __future__ import annotations

import http.client
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pn2v_live.service.viewer import ViewerServer
from pn2v_live.storage.store import KEEP_OPEN, Store

COUNT = 300
SHAPE = (8, 8)


def stored(n: int) -> int:
    return 1 + n % 3


def denoised(n: int) -> int:
    return n % 2


def get(server: ViewerServer, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    result = response.status, response.read()
    connection.close()
    return result


def listing(server: ViewerServer) -> dict[str, dict]:
    status, body = get(server, "/api/acquisitions")
    assert status == 200
    return {summary["name"]: summary for summary in json.loads(body)}


@contextmanager
def serving(root: Path) -> Iterator[tuple[Store, ViewerServer]]:
    """The writer store on `root` (as the daemon opens it) and a real viewer server on it."""
    store = Store(root, writer=True)
    server = ViewerServer(store, "127.0.0.1:0", status=dict)
    server.start()
    try:
        yield store, server
    finally:
        server.stop()
        store.close()


@pytest.fixture(scope="module")
def old_store(tmp_path_factory) -> Path:
    """COUNT closed acquisitions made through the store: acquisition n holds stored(n) frames,
    the first denoised(n) of them denoised."""
    root = tmp_path_factory.mktemp("listing") / "store"
    store = Store(root, writer=True)
    for n in range(COUNT):
        acquisition = store.create(f"old_{n:03d}", SHAPE, "uint16")
        for t in range(stored(n)):
            acquisition.write_raw(t, np.full(SHAPE, n + t, np.uint16))
        for t in range(denoised(n)):
            acquisition.write_denoised(t, np.full(SHAPE, float(n), np.float32), 1)
        acquisition.close()
    store.close()
    return root


def test_list_shows_every_acquisition_with_its_counts_and_keeps_few_open(old_store) -> None:
    with serving(old_store) as (store, server):  # the daemon starting on old acquisitions
        summaries = listing(server)
        assert sorted(summaries) == [f"old_{n:03d}" for n in range(COUNT)]
        for n in range(COUNT):
            summary = summaries[f"old_{n:03d}"]
            counts = (summary["frames"], summary["denoised"], summary["lag"], summary["closed"])
            assert counts == (stored(n), denoised(n), stored(n) - denoised(n), True), summary
            assert (summary["shape"], summary["dtype"]) == (list(SHAPE), "uint16")
        assert store.open_count == 0  # listed without opening any

        for n in range(0, COUNT, 10):  # a user selecting acquisition after acquisition
            status, _ = get(server, f"/api/acquisitions/old_{n:03d}/raw/0")
            assert status == 200
            assert store.open_count <= KEEP_OPEN
        assert store.open_count == KEEP_OPEN

        grown = store.acquisition("old_007")  # a late frame of an old one, then its twin
        grown.write_raw(stored(7), np.full(SHAPE, 1, np.uint16))
        summary = listing(server)["old_007"]
        assert (summary["frames"], summary["denoised"], summary["lag"]) == (3, 1, 2)
        for t in range(stored(7) + 1):
            grown.write_denoised(t, np.full(SHAPE, 1.0, np.float32), 2)
        live = store.create("new", SHAPE, "uint16")
        live.write_raw(0, np.full(SHAPE, 5, np.uint16))
        del grown
        summaries = listing(server)
        assert (summaries["old_007"]["denoised"], summaries["old_007"]["lag"]) == (3, 0)
        assert (summaries["new"]["frames"], summaries["new"]["lag"]) == (1, 1)
        assert len(summaries) == COUNT + 1
        assert store.open_count <= KEEP_OPEN + 1  # `live` is still held here


def test_an_acquisition_in_use_stays_the_one_open_object(old_store) -> None:
    store = Store(old_store)
    try:
        held = store.acquisition("old_000")
        for n in range(1, 3 * KEEP_OPEN):
            store.acquisition(f"old_{n:03d}")
        assert store.acquisition("old_000") is held  # never a second object for one name
        assert store.open_count == KEEP_OPEN
    finally:
        store.close()


def test_a_damaged_acquisition_is_left_out_of_the_list(tmp_path) -> None:
    store = Store(tmp_path / "store", writer=True)
    store.create("good", SHAPE, "uint16").write_raw(0, np.zeros(SHAPE, np.uint16))
    store.create("damaged", SHAPE, "uint16")
    store.close()
    (tmp_path / "store" / "damaged.ome.zarr" / ".zattrs").write_text("{")
    with serving(tmp_path / "store") as (_, server):
        assert list(listing(server)) == ["good"]


def test_a_pass_over_many_acquisitions_leaves_the_recently_shown_one_open(old_store) -> None:
    store = Store(old_store)
    try:
        shown = weakref.ref(store.acquisition("old_001"))  # e.g. the one a viewer page shows
        working = store.open_acquisitions([f"old_{n:03d}" for n in range(100, 100 + KEEP_OPEN)])
        assert store.open_count == KEEP_OPEN + 1
        del working  # a pass that keeps none of them
        assert store.open_count == 1 and store.acquisition("old_001") is shown()
    finally:
        store.close()
