"""Acquire a calibration series with Micro-Manager (pycro-manager) and calibrate pn2v-live.

Run with Micro-Manager open (Tools > Options > "Run pycro-manager server on port 4827") and the
calibration slide in focus, using the detector settings of your experiments:

    pip install pycromanager
    python acquire_calibration_mm.py --frames 50 --out /data/calibration --camera "my-camera"

It records `--frames` frames of the unchanged scene into one OME-TIFF-backed NDTiff dataset,
converts it to a multi-page TIFF and runs `pn2v-live calibrate` on it.
"""

from __future__ import annotations

import argparse
import subprocess
from datetime import date
from pathlib import Path

import numpy as np
import tifffile
from pycromanager import Acquisition, Dataset, multi_d_acquisition_events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=50, help="frames of the static scene")
    parser.add_argument("--out", type=Path, required=True, help="folder for the series")
    parser.add_argument("--camera", default="", help="camera / setting name for the model")
    parser.add_argument("--model", type=Path, default=Path("noise-model.pt"))
    args = parser.parse_args()

    name = f"calibration_{date.today():%Y-%m-%d}"
    with Acquisition(directory=str(args.out), name=name, show_display=False) as acquisition:
        acquisition.acquire(multi_d_acquisition_events(num_time_points=args.frames))
        path = Path(acquisition.get_dataset().path)

    dataset = Dataset(str(path))
    frames = np.stack([dataset.read_image(time=t) for t in range(args.frames)])
    dataset.close()
    stack = args.out / f"{name}.tif"
    tifffile.imwrite(stack, frames)
    print(f"saved {frames.shape} {frames.dtype} to {stack}")
    subprocess.run(
        [
            "pn2v-live",
            "calibrate",
            str(stack),
            "-o",
            str(args.model),
            "--kind",
            "all",
            "--camera",
            args.camera,
            "--report",
            str(args.model.with_suffix(".png")),
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
