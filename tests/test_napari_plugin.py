"""The napari plugin without napari or a display: its npe2 manifest validates, and its reader's
layers hold exactly what the store holds (frames, scale, names, versions), also as it grows."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
from npe2 import PluginManifest

import pn2v_live
from pn2v_live.service.napari_plugin import (
    KEY,
    napari_get_reader,
    read_acquisition,
    refresh_layers,
)
from pn2v_live.service.viewer_render import contrast_limits
from pn2v_live.storage.physical import Physical
from pn2v_live.storage.store import Store

FRAME_SHAPE = (24, 40)
PHYSICAL = Physical(pixel_size_um=(0.065, 0.065), interval_s=0.5)


def frame_at(t: int) -> np.ndarray:
    return (np.arange(np.prod(FRAME_SHAPE)).reshape(FRAME_SHAPE) * 7 + 1000 * t).astype(np.uint16)


def denoised_at(t: int) -> np.ndarray:
    return frame_at(t).astype(np.float32) / 2 + 0.25


def test_manifest_validates_and_is_registered() -> None:
    path = Path(pn2v_live.__file__).parent / "napari.yaml"
    manifest = PluginManifest.from_file(path)  # schema validation (pydantic)
    manifest.validate_imports()  # every command's python_name imports without napari or Qt
    [reader] = manifest.contributions.readers
    assert reader.filename_patterns == ["*.ome.zarr"] and reader.accepts_directories
    assert [w.display_name for w in manifest.contributions.widgets] == ["Follow live acquisitions"]
    [entry] = [e for e in entry_points(group="napari.manifest") if e.name == manifest.name]
    assert entry.value == "pn2v_live:napari.yaml"  # napari finds it when the package is installed


def make_store(root: Path) -> tuple[Store, Path]:
    """An acquisition with raw frames 0-4 and 6 (so valid_t = 5) and denoised 0, 1, 3 and 6."""
    store = Store(root, writer=True)
    acquisition = store.create("cells_01", FRAME_SHAPE, "uint16", PHYSICAL)
    for t in (0, 1, 2, 3, 4, 6):
        acquisition.write_raw(t, frame_at(t))
    for t, version in ((0, 1), (1, 2), (3, 2), (6, 3)):
        acquisition.write_denoised(t, denoised_at(t), model_version=version)
    return store, root / "cells_01.ome.zarr"


def test_reader_returns_what_the_store_holds(tmp_path: Path) -> None:
    store, path = make_store(tmp_path / "store")
    reader = napari_get_reader(str(path))
    assert reader is read_acquisition
    raw, denoised = reader(str(path))
    store.close()

    for (data, kwargs, kind), image in zip((raw, denoised), ("raw", "denoised"), strict=True):
        assert kind == "image" and kwargs["name"] == f"cells_01 {image}"
        assert data.shape == (5, *FRAME_SHAPE)  # valid_t frames, not the stored frame 6
        assert kwargs["scale"] == (0.5, 0.065, 0.065)
        assert kwargs["units"] == ("second", "micrometer", "micrometer")
        assert kwargs["axis_labels"] == ("t", "y", "x")
        assert kwargs["contrast_limits"] == contrast_limits(frame_at(4))  # newest, shared
        assert kwargs["metadata"][KEY]["valid_t"] == 5
    assert raw[0].dtype == np.uint16 and denoised[0].dtype == np.float32
    np.testing.assert_array_equal(raw[0].compute(), [frame_at(t) for t in range(5)])
    expected = [denoised_at(t) if t in (0, 1, 3) else np.zeros(FRAME_SHAPE) for t in range(5)]
    np.testing.assert_array_equal(denoised[0].compute(), expected)  # not yet denoised: 0
    info = denoised[1]["metadata"][KEY]
    assert info["model_versions"] == [1, 2, None, 2, None]
    assert info["model_version"] == 2 and info["denoised_frames"] == 3


def test_reader_takes_only_acquisitions_inside_a_store(tmp_path: Path) -> None:
    store, path = make_store(tmp_path / "store")
    store.close()
    assert napari_get_reader([str(path)]) is read_acquisition
    assert napari_get_reader(str(path / "raw")) is None  # napari-ome-zarr opens one image
    assert napari_get_reader(str(tmp_path / "store")) is None
    assert napari_get_reader(str(tmp_path / "frames.tif")) is None
    copied = tmp_path / "laptop" / path.name  # without its ledger: left to napari-ome-zarr
    shutil.copytree(path, copied)
    assert napari_get_reader(str(copied)) is None


def test_reading_a_live_store_leaves_its_attributes_to_the_writer(tmp_path: Path) -> None:
    """Frames the ledger has but the group's `valid_t` does not count yet (the receiver
    publishes it every 0.25 s) are read, and the reader does not rewrite the attributes."""
    store = Store(tmp_path, writer=True)
    acquisition = store.create("live", FRAME_SHAPE, "uint16")
    acquisition.write_raw(0, frame_at(0))
    acquisition.write_raw(1, frame_at(1), publish=False)
    attrs = (tmp_path / "live.ome.zarr" / ".zattrs").read_bytes()
    assert json.loads(attrs)["pn2v_live"]["valid_t"] == 1
    [(raw, _, _), _] = read_acquisition(str(tmp_path / "live.ome.zarr"))
    np.testing.assert_array_equal(raw.compute(), [frame_at(0), frame_at(1)])
    assert (tmp_path / "live.ome.zarr" / ".zattrs").read_bytes() == attrs
    store.close()


class Layer:
    """The part of a napari Image layer that `refresh_layers` uses (napari needs Qt)."""

    def __init__(self, data, kwargs: dict) -> None:
        self.data, self.scale, self.metadata = data, kwargs["scale"], kwargs["metadata"]
        self.contrast_limits = kwargs.get("contrast_limits", (0.0, 1.0))  # napari's default
        self.refreshed = 0

    def refresh(self) -> None:
        self.refreshed += 1


def test_following_layers_grow_with_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path, writer=True)
    acquisition = store.create("grows", FRAME_SHAPE, "uint16")
    path = tmp_path / "grows.ome.zarr"
    raw, denoised = (Layer(data, kwargs) for data, kwargs, _ in read_acquisition(str(path)))
    assert raw.data.shape[0] == 0 and raw.scale == (1.0, 1.0, 1.0)  # opened before frame 0

    acquisition.write_raw(0, frame_at(0))
    assert refresh_layers([raw, denoised])
    assert raw.data.shape[0] == denoised.data.shape[0] == 1
    assert raw.contrast_limits == denoised.contrast_limits == contrast_limits(frame_at(0))
    raw.contrast_limits = (3.0, 4.0)  # the user's setting stays
    assert not refresh_layers([raw, denoised])  # nothing new
    assert denoised.refreshed == 0
    acquisition.note_physical(PHYSICAL)  # sizes that arrived with a later frame
    for t in (1, 2):
        acquisition.write_raw(t, frame_at(t))
    assert refresh_layers([raw, denoised])
    np.testing.assert_array_equal(raw.data.compute(), [frame_at(t) for t in range(3)])
    assert raw.scale == denoised.scale == (0.5, 0.065, 0.065)
    assert raw.contrast_limits == (3.0, 4.0)

    acquisition.write_denoised(1, denoised_at(1), model_version=4)  # no new frame, a new twin
    assert not refresh_layers([raw, denoised])
    assert denoised.refreshed == 1 and raw.refreshed == 0
    assert denoised.metadata[KEY]["model_versions"] == [None, 4, None]
    np.testing.assert_array_equal(denoised.data[1].compute(), denoised_at(1))
    store.close()
