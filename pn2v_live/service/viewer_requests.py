"""What a viewer request asks, read strictly: ASCII-decimal numbers in paths and queries, query
values in range, and the JSON errors (400, 404, or a refusal that closes its connection) that
say what was wrong; and JSON a browser can parse."""

from __future__ import annotations

import json
import math
import re

from aiohttp import web

# Numbers in URLs: ASCII digits only. str.isdigit() takes '²' (which int() then refuses: a 500),
# int() and float() take '١' (Arabic-Indic one), '1_0' and spaces, and 5,000 digits hit int()'s
# 4,300-digit limit.
MAX_INDEX_DIGITS = 12
ASCII_INT = re.compile(rf"[0-9]{{1,{MAX_INDEX_DIGITS}}}")
ASCII_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
MAX_FLOAT_CHARS = 40


def ascii_int(text: str) -> int | None:
    """A non-negative ASCII-decimal integer of at most MAX_INDEX_DIGITS digits, else None."""
    return int(text) if ASCII_INT.fullmatch(text) else None


def ascii_float(text: str) -> float | None:
    """A finite number written in ASCII decimal ('12', '-0.5', '1e3'), else None (also for
    'nan', 'inf', '1_0', Unicode digits and anything longer than MAX_FLOAT_CHARS)."""
    if len(text) > MAX_FLOAT_CHARS or not ASCII_FLOAT.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


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


def bad_request(message: str) -> web.HTTPBadRequest:
    """400 with `{"error": message}`, to raise."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def not_found(message: str) -> web.HTTPNotFound:
    """404 with `{"error": message}`, to raise."""
    return web.HTTPNotFound(text=json.dumps({"error": message}), content_type="application/json")


def error_response(status: int, message: str, **headers: str) -> web.Response:
    """A JSON error response that closes its connection (for refusals: free the socket)."""
    response = web.json_response({"error": message}, status=status, headers=headers)
    response.force_close()
    return response


def shown(text: str) -> str:
    """A query or path value for an error message (never thousands of characters)."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + f"… ({len(text)} characters)"


def int_query(request: web.Request, key: str, default: int, low: int, high: int) -> int:
    """Query value `key` as an ASCII-decimal integer in [low, high] (`default` when absent); 400
    otherwise."""
    text = request.query.get(key)
    if text is None:
        return default
    value = ascii_int(text)
    if value is None or not low <= value <= high:
        raise bad_request(f"{key}={shown(text)} must be an integer in [{low}, {high}]")
    return value


def float_query(request: web.Request, key: str) -> float | None:
    """Query value `key` as a finite ASCII-decimal number (None when absent); 400 otherwise."""
    text = request.query.get(key)
    if text is None:
        return None
    value = ascii_float(text)
    if value is None:
        raise bad_request(f"{key}={shown(text)} must be a finite decimal number")
    return value
