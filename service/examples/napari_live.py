"""Watch a live pn2v-live acquisition in napari: raw and denoised side by side, growing as the
daemon stores and denoises frames, following the newest frame while the slider sits at the end.

    pip install "pn2v-live[napari]"
    python service/examples/napari_live.py /data/pn2v-live/cells_01.ome.zarr

The same without this script: `napari --plugin pn2v-live /data/pn2v-live/cells_01.ome.zarr`,
then Plugins › pn2v-live › Follow live acquisitions (and the grid button for side by side).
Denoised frames not yet denoised read as 0 until the daemon writes them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pn2v_live.service.napari_plugin import DEFAULT_INTERVAL_S, follow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("acquisition", type=Path, help="path of <name>.ome.zarr in the data root")
    parser.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between refreshes"
    )
    args = parser.parse_args()

    import napari  # imported here so that --help works without a GUI

    viewer = napari.Viewer(title=f"pn2v-live: {args.acquisition.name}")
    viewer.open(args.acquisition, plugin="pn2v-live")
    viewer.grid.enabled = True  # the two layers side by side, sharing zoom, pan and frame
    timer = follow(viewer, args.interval)
    napari.run()
    timer.stop()


if __name__ == "__main__":
    main()
