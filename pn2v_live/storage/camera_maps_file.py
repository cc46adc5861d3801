"""Camera-maps files: one float32 TIFF of three pages (offset ADU, gain ADU/e⁻, read-noise
variance ADU²), opened as a stack by Fiji or napari, with a description of the format's name, a
new line (so that tifffile does not take the JSON for its own) and JSON:

    pn2v-live camera maps
    {"format": "pn2v-live camera maps", "version": 1, "pages": [...],
     "origin": [row, column], "reference": [offset, gain], "metadata": {...}}

`origin` is the sensor position of the maps' pixel [0, 0]. Written atomically.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import tifffile

from pn2v_live.core.camera import CameraMaps
from pn2v_live.errors import UserError
from pn2v_live.storage.atomic import write_atomically
from pn2v_live.storage.file_format import check_format

FORMAT = "pn2v-live camera maps"
VERSION = 1
PAGES = ["offset (ADU)", "gain (ADU per photo-electron)", "read-noise variance (ADU^2)"]


def save_camera_maps(maps: CameraMaps, path: str | Path) -> Path:
    """Write `maps` to `path` (a .tif) atomically; returns the path."""
    description = {
        "format": FORMAT,
        "version": VERSION,
        "pages": PAGES,
        "origin": list(maps.origin),
        "reference": list(maps.reference),
        "metadata": maps.metadata,
    }
    stack = np.stack([maps.offset, maps.gain, maps.variance]).astype(np.float32)

    buffer = io.BytesIO()
    tifffile.imwrite(
        buffer,
        stack,
        photometric="minisblack",
        description=f"{FORMAT}\n{json.dumps(description)}",
        metadata=None,
    )
    return write_atomically(path, lambda file: file.write(buffer.getvalue()))


def load_camera_maps(path: str | Path) -> CameraMaps:
    """Read maps written by `save_camera_maps`; UserError says why a file is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: no such camera-maps file (make one with `pn2v-live calibrate --dark ...`)"
        )
    try:
        with tifffile.TiffFile(path) as tif:
            first_line, _, text = (tif.pages.first.description or "").partition("\n")
            description = json.loads(text) if first_line == FORMAT else None
            stack = tif.asarray()
    except Exception as error:  # tifffile and json raise many types for foreign files
        raise UserError(f"{path}: not a pn2v-live camera-maps file ({error})") from error
    check_format(path, description, FORMAT, VERSION, "camera-maps")
    try:
        return CameraMaps(
            *stack,
            origin=tuple(description["origin"]),
            reference=tuple(description["reference"]),
            metadata=description.get("metadata", {}),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: damaged camera-maps file ({error})") from error
