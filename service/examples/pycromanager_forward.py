"""Forward every frame Micro-Manager acquires (through pycro-manager) to pn2v-live.

    pip install pycromanager            # Micro-Manager must be running with its ZMQ server on
    python service/examples/pycromanager_forward.py --to tcp://127.0.0.1:5555 \
        --acquisition cells_01 --frames 200 --interval-s 0.5

pycro-manager calls `forward` for each image (a 2-D numpy array in the camera's dtype) before
Micro-Manager saves it; the frame goes to the daemon's ZeroMQ receiver and Micro-Manager keeps
its own copy as usual. Frames are numbered by their time index. After the acquisition the
script resends anything the daemon did not store (for instance because it was restarted) and
sends the end marker. Only single-channel, single-plane time series are stored by pn2v-live.
The frames are kept in memory for that resend; for long acquisitions of large frames, reread
them from Micro-Manager's saved dataset instead.
"""

from __future__ import annotations

import argparse

from pn2v_live.pipeline.sender import FrameSender


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--to", default="tcp://127.0.0.1:5555", help="pn2v-live frame endpoint")
    parser.add_argument("--acquisition", required=True, help="acquisition name in the store")
    parser.add_argument("--frames", type=int, required=True, help="number of time points")
    parser.add_argument("--interval-s", type=float, default=0.0, help="time between frames")
    parser.add_argument("--save-dir", default="mm-data", help="where Micro-Manager saves")
    args = parser.parse_args()

    from pycromanager import Acquisition, multi_d_acquisition_events

    sent = {}  # time index -> frame, kept so that lost frames can be resent

    with FrameSender(args.to) as sender:

        def forward(image, metadata):
            t = metadata["Axes"].get("time", len(sent))
            sender.send_frame(args.acquisition, t, image)
            sent[t] = image
            return image  # Micro-Manager stores it as usual

        with Acquisition(
            directory=args.save_dir, name=args.acquisition, image_process_fn=forward
        ) as acquisition:
            acquisition.acquire(
                multi_d_acquisition_events(
                    num_time_points=args.frames, time_interval_s=args.interval_s
                )
            )
        stack = [sent[t] for t in sorted(sent)]
        sender.ensure_stored(args.acquisition, stack, timeout=120)
        sender.end(args.acquisition, frames=len(stack))
    print(f"{args.acquisition}: {len(stack)} frames stored by pn2v-live")


if __name__ == "__main__":
    main()
