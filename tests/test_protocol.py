"""The ZeroMQ message format: round trips and every way a message can be wrong."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from pn2v_live.wire.protocol import (
    EndMessage,
    FrameMessage,
    ProtocolError,
    decode_message,
    encode_end,
    encode_frame,
)

GOOD = {"acquisition": "cells_01", "index": 3, "dtype": "uint16", "shape": [4, 5]}


def message(header: dict, buffer: bytes | None = None) -> list[bytes]:
    if buffer is None:
        buffer = bytes(4 * 5 * 2)
    return [json.dumps(header).encode(), buffer]


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", ">u2"])
def test_frames_round_trip_bit_identical(dtype):
    pixels = (np.arange(4 * 5).reshape(4, 5) * 37).astype(dtype)
    parts = encode_frame("cells_01", 7, pixels, timestamp=12.5)
    decoded = decode_message([bytes(p) for p in parts])
    assert isinstance(decoded, FrameMessage)
    assert (decoded.acquisition, decoded.index, decoded.timestamp) == ("cells_01", 7, 12.5)
    assert decoded.pixels.dtype.byteorder in "<=|" and decoded.pixels.shape == (4, 5)
    np.testing.assert_array_equal(decoded.pixels, pixels)


def test_end_marker_round_trip():
    assert decode_message(encode_end("cells_01", frames=500)) == EndMessage("cells_01", 500)
    assert decode_message(encode_end("cells_01")) == EndMessage("cells_01", None)


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([b"{not json", b""], "json"),
        ([b"\xff\xfe", b""], "json"),
        ([b"[1, 2]", b""], "json"),
        ([b"x" * 70000, b""], "header"),
        ([b"[" * 30000 + b"]" * 30000, b""], "json"),  # nested too deep to parse
        ([b'{"index": ' + b"1" * 5000 + b"}", b""], "json"),  # integer too long to parse
        ([], "parts"),
        ([b"{}", b"", b""], "parts"),
        (message({k: v for k, v in GOOD.items() if k != "index"}), "field"),
        (message({k: v for k, v in GOOD.items() if k != "dtype"}), "field"),
        (message({k: v for k, v in GOOD.items() if k != "shape"}), "field"),
        (message(GOOD | {"colour": "red"}), "field"),
        (message(GOOD | {"index": -1}), "field"),
        (message(GOOD | {"index": 2**24}), "field"),
        (message(GOOD | {"index": 2.5}), "field"),
        (message(GOOD | {"index": True}), "field"),
        (message(GOOD | {"timestamp": "noon"}), "field"),
        (message(GOOD | {"timestamp": float("nan")}), "field"),
        (message(GOOD | {"timestamp": 10**400}), "field"),
        (message(GOOD | {"model_version": -3}), "field"),
        (message(GOOD | {"model_version": "v3"}), "field"),
        (message(GOOD | {"dtype": "float64"}), "dtype"),
        (message(GOOD | {"dtype": "object"}), "dtype"),
        (message(GOOD | {"shape": [4]}), "shape"),
        (message(GOOD | {"shape": [4, 0]}), "shape"),
        (message(GOOD | {"shape": [4, "5"]}), "shape"),
        (message(GOOD | {"shape": [4, 5, 1]}), "shape"),
        (message(GOOD, bytes(39)), "size"),
        (message(GOOD, bytes(41)), "size"),
        ([json.dumps(GOOD).encode()], "parts"),
        ([b'{"acquisition": "a", "end": false}'], "field"),
        ([b'{"acquisition": "a", "end": true}', b"pixels"], "parts"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(parts, reason):
    with pytest.raises(ProtocolError) as error:
        decode_message(parts)
    assert error.value.reason == reason


@pytest.mark.parametrize(
    "header, reason",
    [
        (GOOD | {"dtype": "int16"}, "dtype"),
        (GOOD | {"dtype": "uint32"}, "dtype"),
        (GOOD | {"dtype": "float32"}, "dtype"),
        (GOOD | {"c": 1}, "plane"),
        (GOOD | {"z": 2}, "plane"),
    ],
)
def test_a_storing_receiver_refuses_what_the_store_cannot_keep(header, reason):
    buffer = bytes(4 * 5 * np.dtype(header["dtype"]).itemsize)
    assert isinstance(decode_message(message(header, buffer)), FrameMessage)  # a valid message
    with pytest.raises(ProtocolError, match="cannot be stored") as error:
        decode_message(message(header, buffer), storable=True)
    assert error.value.reason == reason
    pixels = np.zeros((4, 5), header["dtype"])
    plane = {key: header[key] for key in ("c", "z") if key in header}
    with pytest.raises(ProtocolError) as error:
        encode_frame("cells_01", 3, pixels, storable=True, **plane)
    assert error.value.reason == reason


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_camera_frames_decode_for_storing(dtype):
    pixels = np.arange(20, dtype=dtype).reshape(4, 5)
    parts = [bytes(p) for p in encode_frame("cells_01", 0, pixels, storable=True)]
    np.testing.assert_array_equal(decode_message(parts, storable=True).pixels, pixels)


@pytest.mark.parametrize(
    "shape, reason",
    [([100000, 100000], "shape"), ([2**31, 2**31], "shape"), ([16384, 16384], "size")],
)
def test_absurd_shapes_refused_without_allocating_the_claimed_size(shape, reason):
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as error:
            decode_message(message(GOOD | {"dtype": "float32", "shape": shape}, b"tiny"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.value.reason == reason
    assert peak < 1 << 20  # the claims are 1 GiB and more


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "/abs", "a/b", "..", "", ".hidden", "x" * 200, 42, None, "a\\b"]
)
def test_hostile_acquisition_names_refused(name):
    with pytest.raises(ProtocolError) as error:
        decode_message(message(GOOD | {"acquisition": name}))
    assert error.value.reason == "name"
    with pytest.raises(ProtocolError):
        decode_message([json.dumps({"acquisition": name, "end": True}).encode()])
