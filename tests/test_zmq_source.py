"""The ZeroMQ receiver with real sockets and a real store: good, bad, duplicate, blocked."""

from __future__ import annotations

import errno
import json
import logging
import re
import threading
import time

import numpy as np
import pytest
import zarr
import zmq
from prometheus_client import REGISTRY

from pn2v_live.errors import UserError
from pn2v_live.pipeline.zmq_source import ZmqSource
from pn2v_live.pipeline.zmq_status import stored_ranges
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.rejected import Rejected
from pn2v_live.storage.store import Store
from pn2v_live.wire.protocol import ProtocolError, encode_frame, status_endpoint
from pn2v_live.wire.sender import FrameSender


def rejected(reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "pn2v_live_frames_rejected_total", {"source": "zmq", "reason": reason}
    )
    return value or 0.0


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def receiver(tmp_path):
    # Ports the system picks while binding: no other test or program can race for them.
    source = ZmqSource(Store(tmp_path), "tcp://127.0.0.1:*", queue_frames=8)
    source.start()
    yield source
    source.stop()


@pytest.fixture
def sender(receiver):
    with FrameSender(receiver.bind, receiver.status_bind) as sender:
        yield sender


def stack(n: int, shape=(24, 32), dtype="uint16") -> np.ndarray:
    return np.random.default_rng(n).integers(0, 60000, (n, *shape)).astype(dtype)


def test_out_of_order_and_duplicate_frames_are_stored_once(receiver, sender):
    data = stack(10)
    order = [3, 0, 9, 1, 1, 2, 8, 4, 5, 6, 7, 3, 9]
    for t in order:
        sender.send_frame("cells_01", t, data[t])
    sender.end("cells_01", frames=10)
    wait_for(lambda: sender.missing("cells_01", 10) == [])
    wait_for(lambda: receiver.store.acquisition("cells_01").closed)
    acq = receiver.store.acquisition("cells_01")
    assert acq.stored_frames() == list(range(10)) and acq.expected_frames == 10
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(10)]), data)
    wait_for(lambda: receiver.health()["duplicates"] == 3)
    assert receiver.health()["stored"] == 10 and receiver.health()["state"] == "running"
    status = sender.status("cells_01")
    assert status["stored"] == [[0, 10]] and status["valid_t"] == 10 and status["closed"]
    assert sender.status("never_seen")["known"] is False


def test_other_pixels_under_a_stored_frame_number_are_rejected_as_a_conflict(receiver, sender):
    data = stack(3)
    before = rejected("conflict")
    for t in range(3):
        sender.send_frame("cells_02", t, data[t])
    wait_for(lambda: sender.missing("cells_02", 3) == [])
    sender.send_frame("cells_02", 1, data[1])  # a resend: ignored
    sender.send_frame("cells_02", 1, data[1] + 1)  # another frame under number 1
    wait_for(lambda: rejected("conflict") == before + 1)
    wait_for(lambda: receiver.health()["duplicates"] == 1)
    np.testing.assert_array_equal(receiver.store.acquisition("cells_02").read_raw(1), data[1])


def test_bad_messages_are_dropped_and_counted_while_good_frames_store(receiver, sender):
    good = stack(3)
    header = {"acquisition": "a", "index": 0, "dtype": "uint16", "shape": [24, 32]}
    bad = {
        "json": [b"{oops", b""],
        "field": [json.dumps({"acquisition": "a", "dtype": "uint16"}).encode(), b""],
        "size": [json.dumps(header).encode(), bytes(10)],
        "shape": [json.dumps(header | {"shape": [99999, 99999]}).encode(), b"x"],
        "name": [json.dumps(header | {"acquisition": "../../evil"}).encode(), bytes(24 * 32 * 2)],
    }
    before = {reason: rejected(reason) for reason in [*bad, "dtype"]}
    push = sender._push
    sender.send_frame("a", 0, good[0])
    for parts in bad.values():
        push.send_multipart(parts)
    sender.send_frame("a", 1, good[1])
    # right protocol, wrong frame for this acquisition: other size, then other dtype
    sender.send_frame("a", 5, np.zeros((24, 33), np.uint16))
    sender.send_frame("a", 6, np.zeros((24, 32), np.uint8))
    sender.send_frame("a", 2, good[2])
    wait_for(lambda: sender.missing("a", 3) == [])
    wait_for(lambda: rejected("dtype") == before["dtype"] + 1)
    for reason in bad:
        expected = before[reason] + (2 if reason == "shape" else 1)
        wait_for(lambda reason=reason, expected=expected: rejected(reason) == expected)
    acq = receiver.store.acquisition("a")
    assert acq.stored_frames() == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(3)]), good)
    assert not (receiver.store.root.parent / "evil.ome.zarr").exists()
    assert receiver.health()["state"] == "running"


def test_hostile_headers_are_rejected_and_the_receiver_keeps_receiving(receiver, sender):
    header = {"acquisition": "a", "index": 0, "dtype": "uint16", "shape": [24, 32]}
    hostile = [
        ("json", b"[" * 30000 + b"]" * 30000),  # nested deeper than the JSON parser can go
        ("json", json.dumps(header).replace('"index": 0', '"index": ' + "1" * 5000).encode()),
        ("field", json.dumps(header | {"timestamp": 10**400}).encode()),  # not a float
    ]
    before = {reason: rejected(reason) for reason, _ in hostile}
    for _, raw_header in hostile:
        sender._push.send_multipart([raw_header, bytes(24 * 32 * 2)])
    good = stack(1)[0]
    sender.send_frame("a", 0, good)
    wait_for(lambda: sender.missing("a", 1) == [])
    np.testing.assert_array_equal(receiver.store.acquisition("a").read_raw(0), good)
    assert rejected("json") == before["json"] + 2 and rejected("field") == before["field"] + 1
    assert receiver.health()["state"] == "running"


def test_storage_stall_blocks_the_sender_instead_of_dropping(receiver, tmp_path):
    data = stack(300, (256, 256))
    with FrameSender(
        receiver.bind, receiver.status_bind, high_water_mark=4, send_timeout=0.3
    ) as sender:
        sender.send_frame("slow", 0, data[0])
        wait_for(lambda: sender.missing("slow", 1) == [])
        acq = receiver.store.acquisition("slow")
        sent = 1
        with acq._lock:  # storage stalls: writers block inside write_raw
            with pytest.raises(TimeoutError):
                for t in range(1, 300):
                    sender.send_frame("slow", t, data[t])
                    sent += 1
            assert receiver.health()["queue"] == 8  # the bounded queue is full, and visible
        assert 8 < sent < 300
        wait_for(lambda: sender.missing("slow", sent) == [])
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(sent)]), data[:sent])


def queue_bytes_metric() -> float:
    return REGISTRY.get_sample_value("pn2v_live_receive_queue_bytes")


def test_the_queue_is_bounded_in_bytes_and_holds_back_the_sender_losslessly(tmp_path):
    """Storage stalls with 256² frames (128 KiB) and a 1 MiB byte bound: the receiver stops
    reading once it holds the bound (plus at most the message that crossed it), long before its
    64-message bound; the sender is held back, and every frame is stored once storage resumes."""
    frame_bytes = 256 * 256 * 2
    source = ZmqSource(Store(tmp_path), "tcp://127.0.0.1:*", queue_frames=64, queue_bytes=1 << 20)
    source.start()
    data = stack(200, (256, 256))
    try:
        with FrameSender(source.bind, source.status_bind, high_water_mark=4, send_timeout=0.3) as (
            sender
        ):
            sender.send_frame("big", 0, data[0])
            wait_for(lambda: sender.missing("big", 1) == [])
            assert source.health()["queue_bytes"] == 0 and queue_bytes_metric() == 0
            acquisition = source.store.acquisition("big")
            sent = 1
            with acquisition._lock:  # storage stalls: writers block inside write_raw
                with pytest.raises(TimeoutError):
                    for t in range(1, 200):
                        sender.send_frame("big", t, data[t])
                        sent += 1
                health = source.health()
                header = len(encode_frame("big", 199, data[0])[0])
                assert 1 << 20 <= health["queue_bytes"] < (1 << 20) + frame_bytes + header
                assert health["queue_limit_bytes"] == 1 << 20
                assert health["queue"] < 64  # the byte bound held it, not the message bound
                assert queue_bytes_metric() == health["queue_bytes"]
                reply = sender.status("other")  # "big" itself is locked: its status waits
                assert reply["queue_bytes"] == health["queue_bytes"] and reply["refusing"] is None
                assert REGISTRY.get_sample_value("pn2v_live_receive_queue_limit_bytes") == 1 << 20
            assert sent < 200
            wait_for(lambda: sender.missing("big", sent) == [])
            wait_for(lambda: source.health()["queue_bytes"] == 0)
            assert queue_bytes_metric() == 0
        stored = np.stack([acquisition.read_raw(t) for t in range(sent)])
        np.testing.assert_array_equal(stored, data[:sent])
    finally:
        source.stop()


def test_a_frame_bigger_than_the_whole_byte_bound_is_still_stored(tmp_path):
    source = ZmqSource(Store(tmp_path), "tcp://127.0.0.1:*", queue_bytes=1000)
    source.start()
    try:
        with FrameSender(source.bind, source.status_bind) as sender:
            data = stack(3, (64, 64))  # 8 KiB each
            sender.send_stack("huge", data)
            sender.ensure_stored("huge", data, timeout=20)
        np.testing.assert_array_equal(source.store.acquisition("huge").read_raw(2), data[2])
    finally:
        source.stop()


def test_frames_the_store_cannot_keep_are_refused_when_decoded(receiver, sender):
    """int16, uint32 and float32 frames and other planes: refused by reason as they arrive,
    without queueing or creating an acquisition; the sender's own encoder refuses them too."""
    header = {"acquisition": "odd", "index": 0, "shape": [24, 32]}
    before = {reason: rejected(reason) for reason in ("dtype", "plane")}
    for dtype in ("int16", "uint32", "float32"):
        buffer = bytes(24 * 32 * np.dtype(dtype).itemsize)
        sender._push.send_multipart([json.dumps(header | {"dtype": dtype}).encode(), buffer])
        with pytest.raises(ProtocolError, match="cannot be stored") as error:
            sender.send_frame("odd", 0, np.zeros((24, 32), dtype))
        assert error.value.reason == "dtype"
    plane = header | {"dtype": "uint16", "z": 3}
    sender._push.send_multipart([json.dumps(plane).encode(), bytes(24 * 32 * 2)])
    sender.send_frame("fine", 0, stack(1)[0])
    wait_for(lambda: sender.missing("fine", 1) == [])
    wait_for(lambda: rejected("dtype") == before["dtype"] + 3)
    wait_for(lambda: rejected("plane") == before["plane"] + 1)
    assert sender.status("odd")["known"] is False
    assert not receiver.store.path("odd").exists()


def test_ensure_stored_resends_what_the_receiver_lost(receiver, sender):
    data = stack(30)
    # frames 10..19 never reach the receiver, as if it had crashed with them in memory
    sender.send_stack("lossy", data, indices=[*range(10), *range(20, 30)])
    sender.ensure_stored("lossy", data, timeout=30, patience=0.3)
    acq = receiver.store.acquisition("lossy")
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(30)]), data)


def test_status_socket_answers_garbage_with_an_error_and_keeps_answering(receiver, sender):
    context = zmq.Context.instance()
    with context.socket(zmq.REQ) as request:
        request.RCVTIMEO = 10_000  # a dead receiver fails the test instead of hanging it
        request.connect(receiver.status_bind)
        for garbage in (
            [b"hello"],
            [json.dumps({"acquisition": "../x"}).encode()],
            [b"[" * 30000 + b"]" * 30000],
            [json.dumps({"acquisition": "a"}).encode(), b"a second part"],
        ):
            request.send_multipart(garbage)
            assert "error" in request.recv_json()
        request.send_json({"acquisition": "a"})
        assert request.recv_json()["known"] is False
    sender.send_frame("a", 0, stack(1)[0])
    wait_for(lambda: sender.missing("a", 1) == [])
    assert receiver.health()["state"] == "running"


def test_an_oversized_status_request_is_refused_unread_and_others_are_answered(receiver):
    context = zmq.Context.instance()
    with context.socket(zmq.REQ) as hostile, context.socket(zmq.REQ) as friendly:
        hostile.RCVTIMEO, friendly.RCVTIMEO = 2_000, 10_000
        hostile.connect(receiver.status_bind)
        friendly.connect(receiver.status_bind)
        hostile.send_json({"acquisition": "a", "padding": "x" * 1_000_000})  # valid, but 1 MB
        with pytest.raises(zmq.Again):  # libzmq dropped the peer before the receiver read it
            hostile.recv_json()
        friendly.send_json({"acquisition": "a"})
        assert friendly.recv_json()["known"] is False
    assert receiver.health()["state"] == "running"


def test_wildcard_ports_resolve_to_the_ports_really_bound(receiver, tmp_path):
    assert status_endpoint("tcp://127.0.0.1:*") == "tcp://127.0.0.1:*"
    other = ZmqSource(Store(tmp_path / "other"), "tcp://127.0.0.1:*")
    other.start()
    try:
        endpoints = [receiver.bind, receiver.status_bind, other.bind, other.status_bind]
        assert all(re.fullmatch(r"tcp://127\.0\.0\.1:\d+", e) for e in endpoints), endpoints
        assert len(set(endpoints)) == 4
        with FrameSender(other.bind, other.status_bind) as sender:  # reaches `other` only
            sender.send_stack("w", stack(3))
            sender.ensure_stored("w", stack(3), timeout=20)
        assert other.health()["stored"] == 3 and receiver.health()["stored"] == 0
    finally:
        other.stop()


def test_a_frame_arriving_while_its_number_is_written_waits_for_that_write(tmp_path):
    """Two senders, one frame number, at once: the second learns whether it conflicts (or takes
    over when the first write fails) instead of being counted a duplicate unseen."""
    store = Store(tmp_path)
    acquisition = store.create("a", (4, 4), "uint16")
    first, other = np.zeros((4, 4), np.uint16), np.ones((4, 4), np.uint16)
    outcome: dict[int, object] = {}

    def second_sender(t: int) -> threading.Thread:
        def store_other() -> None:
            try:
                outcome[t] = acquisition.put_raw(t, other)
            except Rejected as error:
                outcome[t] = error.reason

        thread = threading.Thread(target=store_other)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive(), "it waits for the write in flight"
        return thread

    assert acquisition._claim(0)  # the first sender's writer is storing frame 0 ...
    waiting = second_sender(0)
    acquisition.write_raw(0, first)  # ... and finishes
    waiting.join(10)
    assert outcome[0] == "conflict"
    np.testing.assert_array_equal(acquisition.read_raw(0), first)

    assert acquisition._claim(1)  # the first sender's write of frame 1 ...
    waiting = second_sender(1)
    acquisition._release(1)  # ... fails (disk full): the waiting frame is stored instead
    waiting.join(10)
    assert outcome[1] == "stored"
    np.testing.assert_array_equal(acquisition.read_raw(1), other)
    store.close()


def test_address_in_use_is_a_user_error(receiver, tmp_path):
    other = ZmqSource(Store(tmp_path / "other"), receiver.bind, "tcp://127.0.0.1:*")
    with pytest.raises(UserError, match="cannot listen on"):
        other.start()


def test_stored_ranges():
    assert stored_ranges([0, 1, 2, 5, 7, 8]) == [[0, 3], [5, 6], [7, 9]]
    assert stored_ranges([]) == []


def test_encode_frame_payload_is_the_pixel_bytes():
    pixels = np.arange(6, dtype=np.uint16).reshape(2, 3)
    header, payload = encode_frame("a", 0, pixels, timestamp=1.0)
    assert bytes(payload) == pixels.tobytes()
    assert json.loads(header) == {
        "acquisition": "a",
        "index": 0,
        "dtype": "uint16",
        "shape": [2, 3],
        "timestamp": 1.0,
    }


def test_acquisition_damaged_on_disk_fails_alone(tmp_path):
    store = Store(tmp_path)
    store.create("damaged", (24, 32), "uint16")
    store.close()
    (tmp_path / "damaged.ome.zarr" / "raw" / "0" / ".zarray").write_text("{ not json")
    source = ZmqSource(Store(tmp_path), "tcp://127.0.0.1:*", queue_frames=8)
    source.start()
    before = rejected("error")
    try:
        with FrameSender(source.bind, source.status_bind) as sender:
            data = stack(2)
            sender.send_frame("damaged", 0, data[0])
            sender.send_frame("fine", 0, data[1])
            wait_for(lambda: sender.missing("fine", 1) == [])
            with pytest.raises(ValueError, match="refused the status request"):
                sender.status("damaged")
        wait_for(lambda: rejected("error") == before + 1)
        assert source.health()["state"] == "running"
        np.testing.assert_array_equal(source.store.acquisition("fine").read_raw(0), data[1])
    finally:
        source.stop()


def test_a_failed_metadata_flush_is_logged_and_retried(receiver, sender, monkeypatch, caplog):
    real_flush = Acquisition.flush
    failures = iter([OSError(errno.ENOSPC, "No space left on device")] * 3)

    def disk_full_once(self, trim=True, **attrs):
        """The first three trimming flushes fail as on a full disk; later ones work."""
        if trim and (error := next(failures, None)):
            raise error
        real_flush(self, trim, **attrs)

    def on_disk(name: str) -> tuple[int, int]:
        """(valid_t, frames in the raw array) as a reader opening `name` now sees them."""
        group = zarr.open_group(receiver.store.path(name), mode="r")
        return group.attrs["pn2v_live"]["valid_t"], group["raw/0"].shape[0]

    monkeypatch.setattr(Acquisition, "flush", disk_full_once)
    caplog.set_level(logging.INFO, logger="pn2v_live.storage.publication")
    data = stack(20)
    sender.send_frame("full", 0, data[0])
    wait_for(lambda: "No space left" in (receiver.health()["last_error"] or ""))
    assert "could not write the metadata of full" in caplog.text
    wait_for(lambda: on_disk("full") == (1, 1))  # the trim failed, stayed pending, then worked
    assert caplog.text.count("could not write the metadata of full") == 1  # not every retry
    wait_for(lambda: "metadata of full written again" in caplog.text)
    sender.send_stack("full", data, indices=range(1, 20))
    wait_for(lambda: on_disk("full") == (20, 20))
    assert receiver.health()["state"] == "running"
    acq = receiver.store.acquisition("full")
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(20)]), data)
