"""The ZeroMQ receiver's status replies: what is stored of an acquisition, so a sender resumes.

Requests (REP, JSON): `{"acquisition": name}` → `{"acquisition", "known", "stored": [[start,
stop), ...], "valid_t", "closed", "queue", "queue_bytes", "queue_limit_bytes", "refusing"}`. A
sender resumes by resending the frames missing from `stored` (see `sender.FrameSender`); a
duplicate of a stored frame is ignored.
"""

from __future__ import annotations

import json

from pn2v_live.storage.layout import validate_name
from pn2v_live.storage.store import Store


def stored_ranges(frames: list[int]) -> list[list[int]]:
    """Sorted frame indices as half-open ranges: [0, 1, 2, 5] → [[0, 3], [5, 6]]."""
    ranges: list[list[int]] = []
    for t in frames:
        if ranges and ranges[-1][1] == t:
            ranges[-1][1] = t + 1
        else:
            ranges.append([t, t + 1])
    return ranges


def status_reply(store: Store, request: list[bytes], receiver: dict) -> dict:
    """The reply to one status request (its message parts; a malformed one gets {"error":
    ...}); `receiver` holds the receiver's own entries ("queue", "queue_bytes",
    "queue_limit_bytes", "refusing")."""
    try:
        if len(request) != 1:
            raise ValueError(f"got {len(request)} message parts, expected 1")
        name = validate_name(json.loads(request[0])["acquisition"])
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        return {"error": f'status request must be {{"acquisition": NAME}}: {error}'}
    reply = {"acquisition": name, "known": True, **receiver}
    try:
        acquisition = store.acquisition(name)
    except KeyError:
        return reply | {"known": False, "stored": [], "valid_t": 0, "closed": False}
    return reply | {
        "stored": stored_ranges(acquisition.stored_frames()),
        "valid_t": acquisition.valid_t,
        "closed": acquisition.closed,
    }
