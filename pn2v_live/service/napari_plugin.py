"""napari plugin: a pn2v-live acquisition as raw and denoised image layers, followed live.

Registered by the npe2 manifest `pn2v_live/napari.yaml` (entry point `napari.manifest`)::

    pip install "pn2v-live[napari]"
    napari --plugin pn2v-live pn2v-data/cells_01.ome.zarr

The reader opens `<name>.ome.zarr` folders inside a store root (the ingest ledger beside them
says which frames are stored and which model denoised each). It gives two lazy (T, Y, X) image
layers, "<name> raw" and "<name> denoised", holding frames 0 … valid_t−1 only, with the physical
scale (frame interval in s, pixel size in µm), shared contrast limits from the newest raw frame,
and in `metadata["pn2v_live"]` the path, `valid_t` and the model versions. Denoised frames not
yet denoised read as 0 (their version is None). An acquisition copied away from its store root
(no ledger) is left to napari-ome-zarr, which opens the same two images without the versions.

`follow(viewer)` (or the dock widget "Follow live acquisitions") re-reads every such layer each
interval: the layers grow as frames are stored, denoised frames appear as they are written, and
the frame slider stays on the newest frame while it sits at the end. The reader and
`refresh_layers` need neither napari nor a display; only `follow` and the widget import Qt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da

from pn2v_live.service.viewer_render import contrast_limits
from pn2v_live.storage.layout import IMAGES, SUFFIX
from pn2v_live.storage.physical import SPACE_UNIT, TIME_UNIT, Physical
from pn2v_live.storage.store import Store, is_store_root

LayerData = tuple[da.Array, dict[str, Any], str]
KEY = "pn2v_live"  # the layers' metadata key
DEFAULT_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Snapshot:
    """One acquisition as the store holds it now: frames [0, valid_t) are stored, and
    `versions[t]` is the model version of denoised frame t (None while not denoised)."""

    path: Path
    valid_t: int
    physical: Physical
    versions: tuple[int | None, ...]

    @property
    def name(self) -> str:
        return self.path.name[: -len(SUFFIX)]


def is_acquisition(path: str | Path) -> bool:
    """Whether `path` is a `<name>.ome.zarr` acquisition inside a store root (ledger beside it)."""
    path = Path(path)
    return (
        path.name.endswith(SUFFIX)
        and all((path / image).is_dir() for image in IMAGES)
        and is_store_root(path.parent)
    )


def snapshot(path: str | Path) -> Snapshot:
    """Read what is stored of the acquisition at `path` (through the store, without its writer
    lock: safe while the daemon writes). KeyError when it is no acquisition."""
    path = Path(path).resolve()
    store = Store(path.parent)
    try:
        acquisition = store.acquisition(path.name[: -len(SUFFIX)])
        valid_t = acquisition.valid_t
        versions = tuple(acquisition.denoised_version(t) for t in range(valid_t))
        return Snapshot(path, valid_t, acquisition.physical, versions)
    finally:
        store.close()


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list] | None:
    """npe2 reader hook: `read_acquisition` when every path is an acquisition, else None."""
    paths = [path] if isinstance(path, str | Path) else path
    return read_acquisition if paths and all(map(is_acquisition, paths)) else None


def read_acquisition(path: str | list[str]) -> list[LayerData]:
    """Raw and denoised layers of each acquisition in `path` (see the module docstring)."""
    paths = [path] if isinstance(path, str | Path) else path
    layers: list[LayerData] = []
    for each in paths:
        layers += acquisition_layers(snapshot(each))
    return layers


def acquisition_layers(snap: Snapshot) -> list[LayerData]:
    """The raw and denoised layer-data tuples (data, kwargs, "image") of `snap`, contrast
    limits (shared, in camera units) from the newest raw frame's 0.5–99.8 percentiles."""
    layers = [image_layer(snap, image) for image in IMAGES]
    if snap.valid_t:
        limits = newest_limits(layers[0][0])
        for _, kwargs, _ in layers:
            kwargs["contrast_limits"] = limits
    return layers


def newest_limits(raw: da.Array) -> tuple[float, float]:
    """Contrast limits (camera units) of the last frame of the (T, Y, X) `raw` data, T >= 1."""
    return contrast_limits(raw[-1].compute())


def image_layer(snap: Snapshot, image: str) -> LayerData:
    """Layer-data tuple of `image` ("raw" or "denoised"): (valid_t, Y, X) lazy data, name,
    scale, axis labels and units, and metadata["pn2v_live"]."""
    data = da.from_zarr(str(snap.path / image / "0"))[: snap.valid_t, 0, 0]
    physical = snap.physical
    y, x = physical.pixel_size_um or (1.0, 1.0)
    space = SPACE_UNIT if physical.pixel_size_um else "pixel"
    metadata = {"path": str(snap.path), "image": image, "valid_t": snap.valid_t}
    if image == "denoised":
        done = [v for v in snap.versions if v is not None]
        metadata |= {
            "model_version": max(done, default=None),  # the newest model among the frames
            "model_versions": list(snap.versions),  # per frame t, None while not denoised
            "denoised_frames": len(done),
        }
    kwargs = {
        "name": f"{snap.name} {image}",
        "scale": (physical.interval_s or 1.0, y, x),
        "axis_labels": ("t", "y", "x"),
        "units": (TIME_UNIT if physical.interval_s else "pixel", space, space),
        "metadata": {KEY: metadata},
    }
    return data, kwargs, "image"


def refresh_layers(layers: Iterable[Any]) -> bool:
    """Bring every pn2v-live layer among `layers` (napari Image layers, or anything with
    `data`, `scale`, `metadata` and `refresh()`) up to what its store holds now: new frames,
    new denoised frames, physical sizes that arrived later. User settings (contrast, colormap)
    stay; a layer opened before its first frame gets contrast limits with it. True when any
    layer gained frames."""
    by_path: dict[str, list[Any]] = {}
    for layer in layers:
        info = getattr(layer, "metadata", {}).get(KEY)
        if info is not None:
            by_path.setdefault(info["path"], []).append(layer)
    grew = False
    for path, group in by_path.items():
        snap = snapshot(path)
        for layer in group:
            old = layer.metadata[KEY]
            data, kwargs, _ = image_layer(snap, old["image"])
            if old["valid_t"] != snap.valid_t:
                grew = True
                layer.data = data
                if not old["valid_t"]:
                    layer.contrast_limits = newest_limits(image_layer(snap, "raw")[0])
            elif old != kwargs["metadata"][KEY]:
                layer.refresh()  # frames denoised since: re-read the shown plane
            if tuple(layer.scale) != kwargs["scale"]:
                layer.scale = kwargs["scale"]
            layer.metadata = {**layer.metadata, KEY: kwargs["metadata"][KEY]}
    return grew


def follow(viewer: Any, interval_s: float = DEFAULT_INTERVAL_S, parent: Any = None) -> Any:
    """Keep the pn2v-live layers of a napari `viewer` current (`refresh_layers` every
    `interval_s` seconds) and the frame slider on the newest frame while it is at the end.
    Returns the running QTimer, a child of the Qt object `parent` when given; keep a reference
    to it otherwise (`.stop()` ends following). Needs napari's Qt event loop::

        viewer = napari.Viewer()
        viewer.open("pn2v-data/cells_01.ome.zarr", plugin="pn2v-live")
        timer = follow(viewer)
        napari.run()
    """
    from qtpy.QtCore import QTimer

    def tick() -> None:
        lengths = [layer.data.shape[0] for layer in viewer.layers if KEY in layer.metadata]
        at_end = bool(lengths) and viewer.dims.current_step[0] >= max(lengths) - 1
        if refresh_layers(viewer.layers) and at_end:
            newest = max(layer.data.shape[0] for layer in viewer.layers if KEY in layer.metadata)
            viewer.dims.set_current_step(0, newest - 1)

    timer = QTimer(parent)
    timer.timeout.connect(tick)
    timer.start(int(interval_s * 1000))
    return timer


class FollowWidget:
    """Dock widget "Follow live acquisitions": a checkbox (on at start) that runs `follow` on
    the viewer's pn2v-live layers. Constructing it returns a QWidget (made here, so that this
    module imports without Qt); napari passes the viewer by the `napari_viewer` name."""

    def __new__(cls, napari_viewer: Any) -> Any:
        from qtpy.QtWidgets import QCheckBox, QVBoxLayout, QWidget

        widget = QWidget()
        box = QCheckBox("Follow live acquisitions")
        box.setToolTip("re-read pn2v-live layers every second and stay on the newest frame")
        box.setChecked(True)
        timer = follow(napari_viewer, parent=widget)
        box.toggled.connect(lambda on: timer.start() if on else timer.stop())
        layout = QVBoxLayout(widget)
        layout.addWidget(box)
        layout.addStretch()
        return widget

    def __init__(self, napari_viewer: Any) -> None:
        """Not called (`__new__` returns a QWidget); napari reads this signature."""
