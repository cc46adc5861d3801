"""An image file's physical metadata, as tifffile parses it, and the OME-TIFF metadata to write.

Read, first found wins: OME-XML (PhysicalSizeX/Y/Z with their units, TimeIncrement, the first
channel's Name), ImageJ metadata (`unit`, `spacing`, `finterval`, `tunit`, with the resolution
tags in that unit), then the TIFF resolution tags in centimetres, millimetres or micrometres.
Resolution tags in inches are ignored: they are the DPI of graphics software (72, 96, 300), not a
microscope's pixel size. A size that is missing, zero, negative or in an unknown unit is unknown.

The frames' position on the camera sensor (a crop or ROI, which selects the sCMOS camera maps'
region) comes from Micro-Manager's per-image metadata (TIFF tag 51123, which Micro-Manager writes
in its TIFF, OME-TIFF and ImageJ files): "ROI": "x-y-width-height", used only when width and
height are the frames'. OME-XML has no such field (Plane PositionX/Y are stage positions in
micrometres), nor have ImageJ metadata or plain TIFF tags: there, `--sensor-origin` or the
configuration says it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import tifffile

from pn2v_live.storage.physical import Physical

log = logging.getLogger(__name__)

MICRO = ("µm", "\u03bcm", "um", "micron", "microns", "\\u00B5m")  # micro sign, Greek mu, ImageJ
LENGTH_UM = {"pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6} | dict.fromkeys(
    MICRO, 1.0
)
DURATION_S = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1.0, "sec": 1.0}
DURATION_S |= {"second": 1.0, "seconds": 1.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
METRIC_RESOLUTION = (
    tifffile.RESUNIT.CENTIMETER,
    tifffile.RESUNIT.MILLIMETER,
    tifffile.RESUNIT.MICROMETER,
)


@dataclass(frozen=True)
class ImageMetadata:
    """What pn2v-live keeps of an image file's metadata: physical sizes, the channel's name, the
    axis its frames lie along ("T" time, or "Z" for a z-stack), and where the frames lie on the
    camera sensor when the file says (module docstring)."""

    physical: Physical = field(default_factory=Physical)
    channel: str | None = None
    frame_axis: str = "T"
    sensor_origin: tuple[int, int] | None = None  # (row, column) of pixel [0, 0] on the sensor


def read_metadata(tif: tifffile.TiffFile) -> ImageMetadata:
    """The physical metadata of `tif`'s first image series (see the module docstring)."""
    axes = tif.series[0].axes if tif.series else ""
    frame_axis = "Z" if "Z" in axes and "T" not in axes else "T"
    channel = None
    physical = None
    if tif.is_ome and tif.ome_metadata:
        physical, channel = _ome(tif.ome_metadata)
    if physical is None and tif.is_imagej:
        physical = _imagej(tif.imagej_metadata or {}, tif.pages.first)
    if physical is None:
        physical = _metric_resolution(tif.pages.first)
    frame_shape = tuple(tif.series[0].shape[-2:]) if tif.series else ()
    return ImageMetadata(physical, channel, frame_axis, micromanager_origin(tif, frame_shape))


def micromanager_origin(
    tif: tifffile.TiffFile, frame_shape: tuple[int, ...]
) -> tuple[int, int] | None:
    """(row, column) on the sensor of the frames' pixel [0, 0] from Micro-Manager's "ROI":
    "x-y-width-height" of the first page (tag 51123); None when there is none, it does not parse,
    or its width and height are not the frames' (`frame_shape` (Y, X): cropped since)."""
    tag = tif.pages.first.tags.get(51123)
    roi = tag.value.get("ROI") if tag is not None and isinstance(tag.value, dict) else None
    if roi is None:
        return None
    parts = roi.split("-") if isinstance(roi, str) else roi
    try:
        x, y, width, height = (int(part) for part in parts)
    except (TypeError, ValueError):
        log.warning("%s: Micro-Manager ROI %r is not x-y-width-height; ignored", tif.filename, roi)
        return None
    if (height, width) != tuple(frame_shape) or x < 0 or y < 0:
        log.warning(
            "%s: Micro-Manager ROI %r does not describe its %s frames (cropped since?); ignored: "
            "give --sensor-origin ROW,COL if they are a crop of the sensor",
            tif.filename, roi, "×".join(map(str, frame_shape)),
        )  # fmt: skip
        return None
    return y, x


def ome_tiff_options(
    metadata: ImageMetadata, axes: str, channel: str, description: str
) -> dict[str, object]:
    """`tifffile.imwrite` options that write an OME-TIFF of `axes` (e.g. "TYX", "YX") with
    `metadata`'s physical sizes, the channel name `channel` and the image description
    `description`; resolution tags in centimetres too, for readers without OME support."""
    physical = metadata.physical
    ome: dict[str, object] = {"axes": axes, "Channel": {"Name": channel}}
    ome["Description"] = description
    options: dict[str, object] = {"ome": True, "metadata": ome}
    if physical.pixel_size_um is not None:
        y, x = physical.pixel_size_um
        ome |= {"PhysicalSizeY": y, "PhysicalSizeX": x}
        ome |= {"PhysicalSizeYUnit": "µm", "PhysicalSizeXUnit": "µm"}
        options |= {"resolution": (1e4 / x, 1e4 / y), "resolutionunit": "CENTIMETER"}
    if physical.z_step_um is not None:
        ome |= {"PhysicalSizeZ": physical.z_step_um, "PhysicalSizeZUnit": "µm"}
    if physical.interval_s is not None:
        ome |= {"TimeIncrement": physical.interval_s, "TimeIncrementUnit": "s"}
    return options


def _ome(xml: str) -> tuple[Physical | None, str | None]:
    """(sizes, first channel's name) of the first Image in OME-XML; sizes None when it gives
    none."""
    try:
        image = _first(tifffile.xml2dict(xml).get("OME", {}).get("Image"))
    except Exception as error:  # damaged XML: the pixels may still be fine
        log.warning("OME-XML unreadable, physical sizes unknown: %s", error)
        return None, None
    pixels = image.get("Pixels") or {}
    channel = _first(pixels.get("Channel")).get("Name")
    sizes = {
        axis: _scaled(
            pixels.get(f"PhysicalSize{axis}"),
            pixels.get(f"PhysicalSize{axis}Unit", "µm"),
            LENGTH_UM,
        )
        for axis in "YXZ"
    }
    interval = _scaled(
        pixels.get("TimeIncrement"), pixels.get("TimeIncrementUnit", "s"), DURATION_S
    )
    physical = _physical(sizes["Y"], sizes["X"], sizes["Z"], interval)
    return (physical if physical.known else None), (str(channel) if channel else None)


def _imagej(imagej: dict, page: tifffile.TiffPage) -> Physical | None:
    """Sizes from ImageJ metadata: resolution tags in pixels per `unit`, `spacing` in `unit`,
    `finterval` in `tunit` (default seconds); None when it gives none."""
    unit = imagej.get("unit", "")
    x_resolution, y_resolution = page.resolution
    y = _scaled(_inverse(y_resolution), unit, LENGTH_UM)
    x = _scaled(_inverse(x_resolution), unit, LENGTH_UM)
    z = _scaled(imagej.get("spacing"), unit, LENGTH_UM)
    interval = _scaled(imagej.get("finterval"), imagej.get("tunit", "s"), DURATION_S)
    physical = _physical(y, x, z, interval)
    return physical if physical.known else None


def _metric_resolution(page: tifffile.TiffPage) -> Physical:
    """The pixel size that resolution tags in a metric unit give."""
    if page.resolutionunit not in METRIC_RESOLUTION:
        return Physical()
    x_per_um, y_per_um = page.get_resolution(tifffile.RESUNIT.MICROMETER)
    return _physical(_inverse(y_per_um), _inverse(x_per_um), None, None)


def _physical(
    y: float | None, x: float | None, z: float | None, interval: float | None
) -> Physical:
    """Physical of the given sizes; a pixel size needs both y and x."""
    return Physical(None if y is None or x is None else (y, x), z, interval)


def _scaled(value: object, unit: object, units: dict[str, float]) -> float | None:
    """`value` in `unit` converted by the factor `units` gives, when both are usable and the
    result is positive and finite; else None."""
    try:
        size = float(value) * units[str(unit).strip()]
    except (TypeError, ValueError, KeyError):
        return None
    return size if math.isfinite(size) and size > 0 else None


def _inverse(value: float) -> float | None:
    return 1.0 / value if value else None


def _first(value: object) -> dict:
    """The first of a repeated OME element (xml2dict gives a list for several), {} for none."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, dict) else {}
