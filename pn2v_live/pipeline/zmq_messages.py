"""What a received ZeroMQ message does to the store: a frame is stored, an end marker closes
its acquisition."""

from __future__ import annotations

import logging

from pn2v_live.storage.rejected import FrameCheck, Rejected
from pn2v_live.storage.store import Store
from pn2v_live.wire.protocol import EndMessage, FrameMessage

log = logging.getLogger("pn2v_live.pipeline.zmq_source")  # the receiver's lines, as one component


def store_message(
    store: Store, message: FrameMessage | EndMessage, check: FrameCheck | None
) -> str:
    """Store a frame ("stored", or "duplicate" when it is stored already: nothing written) or
    close an acquisition ("closed"); `Rejected` for an end marker of an unknown acquisition, a
    frame of another plane than c = z = 0, or one `check` refuses."""
    if isinstance(message, EndMessage):
        try:
            acquisition = store.acquisition(message.acquisition)
        except KeyError:
            raise Rejected(
                "unknown", f"end marker for {message.acquisition!r}, which has no frames"
            ) from None
        acquisition.close(message.frames)
        log.info("%s closed by its sender (%s frames announced)", acquisition.name, message.frames)
        return "closed"
    if message.c or message.z:
        raise Rejected("plane", "only single-plane frames (c = 0, z = 0) are stored")
    return store.put_raw(
        message.acquisition,
        message.index,
        message.pixels,
        physical=message.physical,
        sensor_origin=message.sensor_origin,
        check=check,
    )
