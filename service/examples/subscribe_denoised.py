"""Receive the denoised frames a running `pn2v-live serve` publishes, and print or save them.

    python service/examples/subscribe_denoised.py tcp://127.0.0.1:5557
    python service/examples/subscribe_denoised.py tcp://127.0.0.1:5557 --acquisition cells_01 \
        --save denoised_tiffs/ --count 100

Messages are the ingest protocol's [JSON header, pixel buffer] with dtype float32 (see
pn2v_live/wire/protocol.py); replace the print with whatever your tool does per frame.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import zmq

from pn2v_live.storage.images import write_tiff
from pn2v_live.wire.protocol import FrameMessage, decode_message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address", help="the daemon's [publish] bind, e.g. tcp://127.0.0.1:5557")
    parser.add_argument("--acquisition", help="only frames of this acquisition")
    parser.add_argument("--save", type=Path, help="write each frame as DIR/<acquisition>_<t>.tif")
    parser.add_argument("--count", type=int, help="stop after this many frames")
    args = parser.parse_args()

    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(args.address)
    received = 0
    while args.count is None or received < args.count:
        message = decode_message(socket.recv_multipart())
        if not isinstance(message, FrameMessage):
            continue
        if args.acquisition and message.acquisition != args.acquisition:
            continue
        received += 1
        frame = message.pixels
        print(
            f"{message.acquisition} t={message.index} model v{message.model_version} "
            f"{frame.shape[0]}x{frame.shape[1]} "
            f"mean={frame.mean():.2f} min={frame.min():.2f} max={frame.max():.2f}",
            flush=True,
        )
        if args.save:
            write_tiff(args.save / f"{message.acquisition}_{message.index:06d}.tif", frame)


if __name__ == "__main__":
    main()
