"""Watch a live pn2v-live acquisition in napari: raw and denoised side by side, growing as the
daemon stores and denoises frames, following the newest frame while the slider sits at the end.

    pip install "napari[all]"
    python service/examples/napari_live.py /data/pn2v-live/cells_01.ome.zarr

For a finished acquisition napari-ome-zarr alone is enough:
`napari --plugin napari-ome-zarr /data/pn2v-live/cells_01.ome.zarr/raw` (and `.../denoised`).
Denoised frames not yet denoised read as 0 until the daemon writes them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dask.array as da
import zarr

IMAGES = ("raw", "denoised")


def valid_frames(path: Path) -> int:
    """Frames [0, valid_t) of the acquisition at `path` are complete (the store's `valid_t`)."""
    return zarr.open_group(path, mode="r").attrs.get("pn2v_live", {}).get("valid_t", 0)


def frames(path: Path, image: str, count: int) -> da.Array:
    """Lazy (count, Y, X) dask array of `image` ("raw" or "denoised"), full resolution."""
    return da.from_zarr(str(path / image / "0"))[:count, 0, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("acquisition", type=Path, help="path of <name>.ome.zarr in the data root")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    args = parser.parse_args()

    import napari  # imported here so the helpers above work without a GUI
    from qtpy.QtCore import QTimer

    while (count := valid_frames(args.acquisition)) == 0:
        time.sleep(args.interval)
    viewer = napari.Viewer(title=f"pn2v-live: {args.acquisition.name}")
    first = frames(args.acquisition, "raw", 1).compute()
    limits = (float(first.min()), float(first.max()) or 1.0)
    layers = {
        image: viewer.add_image(
            frames(args.acquisition, image, count), name=image, contrast_limits=limits
        )
        for image in IMAGES
    }
    viewer.grid.enabled = True  # the two layers side by side, sharing zoom, pan and frame

    def refresh() -> None:
        shown = layers["raw"].data.shape[0]
        count = valid_frames(args.acquisition)
        if count == shown:
            layers["denoised"].refresh()  # the newest frames may have been denoised since
            return
        following = viewer.dims.current_step[0] >= shown - 1
        for image, layer in layers.items():
            layer.data = frames(args.acquisition, image, count)
        if following:
            viewer.dims.set_current_step(0, count - 1)

    timer = QTimer()
    timer.timeout.connect(refresh)
    timer.start(int(args.interval * 1000))
    napari.run()


if __name__ == "__main__":
    main()
