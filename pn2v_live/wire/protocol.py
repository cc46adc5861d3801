"""The ZeroMQ frame protocol: a message is [JSON header, pixel buffer].

Header (UTF-8 JSON object, at most 64 KiB)::

    {"acquisition": "cells_01",   # safe name: letters, digits, . _ -, no '..'
     "index": 17,                 # frame number within the acquisition, >= 0
     "dtype": "uint16",           # one of DTYPES, little-endian (stored: STORED_DTYPES)
     "shape": [512, 512],         # [Y, X], each 1..MAX_SIDE
     "timestamp": 1732580000.25,  # optional, Unix seconds when the camera took it
     "c": 0, "z": 0,              # optional plane indices (channel, z-slice), default 0
     "pixel_size_um": [0.065, 0.065],  # optional [y, x] pixel size in micrometres
     "interval_s": 0.5,           # optional frame interval in seconds
     "sensor_origin": [0, 512],   # optional [row, column] of pixel [0, 0] on the camera sensor
     "model_version": 3}          # optional; set on denoised frames (the model that made them)

`pixel_size_um` and `interval_s` must be positive finite numbers; the receiver writes them into
the acquisition's metadata (the first frame that carries them sets them), and `sensor_origin` (a
crop's or ROI's place on the sensor, which picks its region of sCMOS camera maps) likewise.
The buffer holds exactly Y*X*itemsize bytes in C order. End of an acquisition is a one-part
message `{"acquisition": "cells_01", "end": true, "frames": 500}` (`frames`, the total count,
is optional). `decode_message` checks every field and the buffer size from the header alone, so
a hostile header can never make the receiver allocate what it claims.

The protocol also carries what the store does not keep (the publisher's float32 denoised frames).
A receiver that stores frames decodes with `storable=True`, which refuses at once, with a reason
the sender can act on, a frame the store could not take: a dtype other than uint8/uint16
(reason "dtype") or a plane other than c = z = 0 ("plane"). `FrameSender` encodes with the same
check, so a sender learns it before sending.

Beside the frame socket (PUSH → PULL) a receiver answers status requests on a REP socket, by
default at the frame endpoint's port + 1 (`status_endpoint`).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from pn2v_live.errors import UserError
from pn2v_live.storage.layout import RAW_DTYPES, validate_name
from pn2v_live.storage.physical import Physical

DTYPES = ("uint8", "uint16", "int16", "uint32", "float32")
STORED_DTYPES = RAW_DTYPES  # what a receiver stores: camera frames, uint8 or uint16
MAX_SIDE = 32768
MAX_PIXELS = 1 << 28  # 256 Mpixel: 1 GiB of float32, far beyond any camera frame
MAX_HEADER_BYTES = 65536
MAX_INDEX = 2**24 - 1  # 16.7 million frames: days at 100 frames/s; bounds array length
PHYSICAL_FIELDS = ("pixel_size_um", "interval_s")  # optional physical sizes of a frame


def status_endpoint(endpoint: str) -> str:
    """The status (REP) endpoint paired with a frame endpoint: same host, port + 1 (a wildcard
    port `*`, which the system resolves when binding, pairs with another wildcard)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":*"):
        return endpoint
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or parts.port is None:
        raise UserError(
            f"cannot derive a status endpoint from {endpoint!r}: give tcp://HOST:PORT "
            "or name the status endpoint explicitly"
        )
    return f"tcp://{parts.hostname}:{parts.port + 1}"


class ProtocolError(ValueError):
    """A message that breaks the protocol; `reason` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FrameMessage:
    """One decoded frame; `pixels` is a read-only (Y, X) view of the received buffer."""

    acquisition: str
    index: int
    pixels: np.ndarray
    timestamp: float
    c: int = 0
    z: int = 0
    model_version: int | None = None
    physical: Physical = field(default_factory=Physical)  # from pixel_size_um and interval_s
    sensor_origin: tuple[int, int] | None = None  # [row, column] of pixel [0, 0] on the sensor


@dataclass(frozen=True)
class EndMessage:
    """End of an acquisition; `frames` is the total frame count when the sender gave it."""

    acquisition: str
    frames: int | None = None


def encode_frame(
    acquisition: str,
    index: int,
    pixels: np.ndarray,
    timestamp: float | None = None,
    c: int = 0,
    z: int = 0,
    model_version: int | None = None,
    storable: bool = False,
    physical: Physical | None = None,
    sensor_origin: tuple[int, int] | None = None,
) -> list[bytes | memoryview]:
    """The two message parts for one (Y, X) frame, with `physical`'s pixel size and frame
    interval and the frame's `sensor_origin` (row, column) when known; the buffer part is
    zero-copy when possible.

    ProtocolError for a frame the protocol cannot carry, and with `storable` also for one a
    receiver cannot store (see the module docstring)."""
    pixels = np.ascontiguousarray(pixels)
    dtype = pixels.dtype.newbyteorder("<") if pixels.dtype.byteorder == ">" else pixels.dtype
    pixels = pixels.astype(dtype, copy=False)
    header = {
        "acquisition": acquisition,
        "index": int(index),
        "dtype": pixels.dtype.name,
        "shape": list(pixels.shape),
        "timestamp": time.time() if timestamp is None else float(timestamp),
    }
    if c or z:
        header |= {"c": int(c), "z": int(z)}
    if model_version is not None:
        header["model_version"] = int(model_version)
    if physical is not None:
        header |= {k: v for k, v in physical.as_dict().items() if k in PHYSICAL_FIELDS}
    if sensor_origin is not None:
        header["sensor_origin"] = [int(sensor_origin[0]), int(sensor_origin[1])]
    _check_header(header)
    if storable:
        _check_storable(header)
    return [json.dumps(header).encode(), memoryview(pixels).cast("B")]


def encode_end(acquisition: str, frames: int | None = None) -> list[bytes]:
    """The one-part message that closes `acquisition` (optionally saying how many frames)."""
    header: dict = {"acquisition": acquisition, "end": True}
    if frames is not None:
        header["frames"] = int(frames)
    _check_end(header)
    return [json.dumps(header).encode()]


def decode_message(parts: list[bytes], storable: bool = False) -> FrameMessage | EndMessage:
    """Validate and decode a received multipart message; raises ProtocolError saying why.

    With `storable`, a frame the store cannot keep is refused too (see the module docstring)."""
    if not parts or len(parts) > 2:
        raise ProtocolError("parts", f"expected 1 or 2 message parts, got {len(parts)}")
    raw_header = parts[0]
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ProtocolError(
            "header", f"header is {len(raw_header)} bytes, limit {MAX_HEADER_BYTES}"
        )
    try:
        header = json.loads(bytes(raw_header).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # also too deep nesting, too long integers
        raise ProtocolError("json", f"header is not valid JSON: {error}") from error
    if not isinstance(header, dict):
        raise ProtocolError("json", f"header must be a JSON object, got {type(header).__name__}")
    if header.get("end") is not None:
        _check_end(header)
        if len(parts) == 2 and len(parts[1]):
            raise ProtocolError("parts", "an end message carries no pixel buffer")
        return EndMessage(header["acquisition"], header.get("frames"))
    _check_header(header)
    if storable:
        _check_storable(header)
    if len(parts) != 2:
        raise ProtocolError("parts", "a frame message needs 2 parts: header and pixel buffer")
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    height, width = header["shape"]
    expected = height * width * dtype.itemsize
    buffer = parts[1]
    if len(buffer) != expected:
        raise ProtocolError(
            "size",
            f"buffer is {len(buffer)} bytes, header says {height}x{width} {dtype.name} "
            f"= {expected} bytes",
        )
    pixels = np.frombuffer(buffer, dtype=dtype).reshape(height, width)
    return FrameMessage(
        acquisition=header["acquisition"],
        index=header["index"],
        pixels=pixels,
        timestamp=header.get("timestamp", time.time()),
        c=header.get("c", 0),
        z=header.get("z", 0),
        model_version=header.get("model_version"),
        physical=_physical(header),
        sensor_origin=_sensor_origin(header),
    )


def _check_header(header: dict) -> None:
    missing = [k for k in ("acquisition", "index", "dtype", "shape") if k not in header]
    if missing:
        raise ProtocolError("field", f"header lacks {', '.join(missing)}")
    known = {"acquisition", "index", "dtype", "shape", "timestamp", "c", "z", "model_version"}
    known |= {"sensor_origin"}
    unknown = set(header) - known - set(PHYSICAL_FIELDS)
    if unknown:
        raise ProtocolError("field", f"unknown header field(s): {', '.join(sorted(unknown))}")
    _check_name(header["acquisition"])
    _check_int(header, "index", MAX_INDEX)
    for key, limit in (("c", 65535), ("z", 65535), ("model_version", 2**31 - 1)):
        if key in header:
            _check_int(header, key, limit)
    if header["dtype"] not in DTYPES:
        raise ProtocolError(
            "dtype", f"dtype {header['dtype']!r} not allowed; use one of {', '.join(DTYPES)}"
        )
    shape = header["shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(_is_int(n) and 1 <= n <= MAX_SIDE for n in shape)
    ):
        raise ProtocolError("shape", f"shape must be [Y, X] with 1 <= Y, X <= {MAX_SIDE}: {shape}")
    if shape[0] * shape[1] > MAX_PIXELS:
        raise ProtocolError("shape", f"shape {shape} exceeds {MAX_PIXELS} pixels")
    timestamp = header.get("timestamp", 0.0)
    if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
        raise ProtocolError("field", f"timestamp must be a number, got {timestamp!r}")
    if not 0 <= timestamp <= sys.float_info.max:  # also refuses NaN, inf and huge integers
        raise ProtocolError("field", f"timestamp must be finite and >= 0, got {timestamp}")
    _physical(header)
    _sensor_origin(header)


def _sensor_origin(header: dict) -> tuple[int, int] | None:
    """A header's `sensor_origin` [row, column]; ProtocolError unless two integers 0..MAX_SIDE."""
    origin = header.get("sensor_origin")
    if origin is None:
        return None
    if not (
        isinstance(origin, list) and len(origin) == 2 and all(_is_int(n) for n in origin)
    ) or not all(0 <= n <= MAX_SIDE for n in origin):
        raise ProtocolError(
            "field", f"sensor_origin must be [row, column], integers 0..{MAX_SIDE}: {origin!r}"
        )
    return origin[0], origin[1]


def _physical(header: dict) -> Physical:
    """The sizes in a header's `pixel_size_um` ([y, x], µm) and `interval_s` (s); ProtocolError
    when one is not a positive finite number (or the pixel size not a pair of them)."""
    pixel_size = header.get("pixel_size_um")
    if pixel_size is not None and not (isinstance(pixel_size, list) and len(pixel_size) == 2):
        raise ProtocolError("field", f"pixel_size_um must be [y, x] in µm, got {pixel_size!r}")
    try:
        return Physical(pixel_size and tuple(pixel_size), interval_s=header.get("interval_s"))
    except ValueError as error:
        raise ProtocolError("field", f"{', '.join(PHYSICAL_FIELDS)}: {error}") from None


def _check_storable(header: dict) -> None:
    """Refuse a well-formed frame header that the store cannot keep."""
    if header["dtype"] not in STORED_DTYPES:
        raise ProtocolError(
            "dtype",
            f"dtype {header['dtype']!r} cannot be stored: the store keeps camera frames as "
            f"{' or '.join(STORED_DTYPES)}; convert the frames before sending (e.g. int16 with "
            "an offset to uint16)",
        )
    if header.get("c", 0) or header.get("z", 0):
        raise ProtocolError(
            "plane",
            f"plane c = {header.get('c', 0)}, z = {header.get('z', 0)} cannot be stored: only "
            "single-plane frames (c = 0, z = 0) are; send each channel or z-slice as its own "
            "acquisition",
        )


def _check_end(header: dict) -> None:
    if header.get("end") is not True:
        raise ProtocolError("field", f"end must be true, got {header.get('end')!r}")
    if "acquisition" not in header:
        raise ProtocolError("field", "end message lacks acquisition")
    unknown = set(header) - {"acquisition", "end", "frames", "timestamp"}
    if unknown:
        raise ProtocolError("field", f"unknown end-message field(s): {', '.join(sorted(unknown))}")
    _check_name(header["acquisition"])
    if "frames" in header:
        _check_int(header, "frames", MAX_INDEX)


def _check_name(name: object) -> None:
    try:
        validate_name(name)
    except ValueError as error:
        raise ProtocolError("name", str(error)) from error


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(header: dict, key: str, limit: int) -> None:
    value = header[key]
    if not _is_int(value) or not 0 <= value <= limit:
        raise ProtocolError("field", f"{key} must be an integer 0..{limit}, got {value!r}")
