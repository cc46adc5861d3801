"""ZeroMQ PUB of denoised frames, in the ingest protocol's format, for other tools to subscribe.

Each denoised frame goes out as [JSON header, float32 pixel buffer] exactly as
`protocol.encode_frame` builds it (acquisition, index = frame number t, dtype "float32", shape,
timestamp = when it was denoised, model_version = the model that denoised it, and the
acquisition's pixel_size_um and interval_s when known), so
`protocol.decode_message` reads it back. Subscribers subscribe to everything (topic b"") and
filter on the header's `acquisition`. A PUB socket never blocks the daemon: a subscriber too
slow to keep up loses frames beyond the high-water mark.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import zmq

from pn2v_live.errors import UserError
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.wire.protocol import encode_frame

log = logging.getLogger(__name__)


class DenoisedPublisher:
    """Binds a PUB socket on `bind` (e.g. tcp://127.0.0.1:5557) and publishes denoised frames.

    `publish` has the inference stage's frame-listener signature and is safe to call from any
    thread.
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:5557", high_water_mark: int = 100) -> None:
        self.bind = bind
        self.high_water_mark = high_water_mark
        self._socket: zmq.Socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Bind the socket; raises UserError when the address is taken or malformed."""
        socket = zmq.Context.instance().socket(zmq.PUB)
        socket.setsockopt(zmq.SNDHWM, self.high_water_mark)
        socket.setsockopt(zmq.LINGER, 0)
        try:
            socket.bind(self.bind)
        except zmq.ZMQError as error:
            socket.close()
            raise UserError(
                f"cannot publish denoised frames on {self.bind}: {error}; "
                "choose another [publish] bind or stop the program using it"
            ) from error
        self.bind = socket.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves a wildcard port
        self._socket = socket
        log.info("publishing denoised frames on %s", self.bind)

    def publish(
        self, acquisition: Acquisition, t: int, frame: np.ndarray, model_version: int
    ) -> None:
        """Send denoised frame `t` (float32, Y × X) of `acquisition`, made by model
        `model_version` (in the header); dropped if not started."""
        if self._socket is None:
            return
        parts = encode_frame(
            acquisition.name,
            t,
            np.asarray(frame, np.float32),
            model_version=model_version,
            physical=acquisition.physical,
        )
        with self._lock:
            self._socket.send_multipart(parts)

    def stop(self) -> None:
        """Close the socket (frames not yet sent are dropped)."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
