"""Acquire sCMOS dark and flat-field series with Micro-Manager (pycro-manager) and calibrate
the camera maps with pn2v-live (see scmos.md).

Run with Micro-Manager open (Tools > Options > "Run pycro-manager server on port 4827") and the
camera at the settings of your experiments:

    pip install pycromanager
    python acquire_scmos_maps_mm.py --frames 200 --levels 4 --out /data/scmos --camera "orca"

It asks you to cap the camera for the dark series, then to set each light level (an evenly lit
field, from about 10 % to 70 % of the camera's range), records `--frames` frames of each as a
multi-page TIFF and runs `pn2v-live calibrate --dark ... --flat ...`.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np
import tifffile
from pycromanager import Acquisition, Dataset, multi_d_acquisition_events


def record(out: Path, name: str, frames: int) -> Path:
    """`frames` frames at the current settings as `<out>/<name>.tif`."""
    with Acquisition(directory=str(out), name=name, show_display=False) as acquisition:
        acquisition.acquire(multi_d_acquisition_events(num_time_points=frames))
        path = Path(acquisition.get_dataset().path)
    dataset = Dataset(str(path))
    stack = np.stack([dataset.read_image(time=t) for t in range(frames)])
    dataset.close()
    target = out / f"{name}.tif"
    tifffile.imwrite(target, stack, photometric="minisblack")
    print(f"saved {stack.shape} {stack.dtype} to {target}, mean {stack.mean():.1f} ADU")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per series")
    parser.add_argument("--levels", type=int, default=4, help="flat-field light levels")
    parser.add_argument("--out", type=Path, required=True, help="folder for the series")
    parser.add_argument("--camera", default="", help="camera / setting name")
    parser.add_argument("--model", type=Path, default=Path("scmos-noise.pt"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    input("Cap the camera (no light at all), then press Enter for the dark series ... ")
    dark = record(args.out, "dark", args.frames)
    flats = []
    for level in range(args.levels):
        share = 10 + 60 * level / max(args.levels - 1, 1)
        input(f"Set an even illumination at about {share:.0f} % of the range, then Enter ... ")
        flats.append(record(args.out, f"flat{level + 1}", args.frames))
    command = ["pn2v-live", "calibrate", "-o", str(args.model), "--dark", str(dark)]
    for flat in flats:
        command += ["--flat", str(flat)]
    command += ["--camera", args.camera, "--report", str(args.model.with_suffix(".png"))]
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
