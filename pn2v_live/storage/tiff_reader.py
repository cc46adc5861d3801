"""Reading a TIFF / OME-TIFF as grey-scale frames (T, Y, X), in one of two modes.

Strict, for files of a live acquisition (folder ingest): the file must be complete and hold
one grey-scale plane per frame. Truncation is caught three ways: pages whose data lie beyond
the end of the file, errors tifffile logs while following the page chain, and pixel data that
fail to decode. Only this file's pixels are read, never those of the other files of a
multi-file OME-TIFF set (a BinaryOnly file of the set takes its channel and z-plane counts from
the set's metadata file beside it); frames appended call by call are read as one stack.

Tolerant, for a user's own file (denoise, train, calibrate, ingest --file): the first image
series, a multi-file set read whole, an OME-TIFF of channels only read as frames with a
warning; colour and multi-channel images are refused saying how to pick one channel.

Either way a file that is not grey-scale frames raises `TiffRefused`, whose `reason` is a short
label and whose text says why and what to do.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import tifffile

from pn2v_live.storage.tiff_metadata import ImageMetadata, read_metadata

log = logging.getLogger(__name__)

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
FRAME_AXES = "TIQYX"  # tifffile axes a stack of frames may have: time, sequence, unknown, plane
PLANE_NAMES = {"C": "channels", "Z": "z-planes", "S": "colour samples per pixel"}
# TIFF photometric interpretations that are not one grey value per pixel.
COLOUR_PHOTOMETRICS = {2: "RGB", 3: "palette colour", 5: "CMYK", 6: "YCbCr", 8: "CIELab"}
SPLIT_HINT = "Fiji: Image > Color > Split Channels, then save the one to denoise"


class TiffRefused(Exception):
    """A file that cannot be read as grey-scale frames: `reason` is a short label ("empty",
    "not_image", "truncated", "layout", "shape", "colour"), the text says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def read_tiff(path: Path, strict: bool = False) -> tuple[np.ndarray, ImageMetadata]:
    """The frames (T, Y, X), dtype kept, and the metadata of a (multi-page, OME-)TIFF, read
    strictly or tolerantly (see the module docstring); raises TiffRefused saying why not.

    In strict mode an operating-system error (permissions, a lock, I/O) is raised as is: the file
    may be readable later; tolerant mode lets tifffile's errors through for the caller to word."""
    data, metadata = _read_strict(path) if strict else _read_tolerant(path)
    return as_frames(data, path.name), metadata


def as_frames(array: np.ndarray, name: str) -> np.ndarray:
    """`array` with singleton axes squeezed as (T, Y, X); TiffRefused ("shape") for 4-D+ data
    and for frames 3 or 4 pixels wide (colour samples read as pixels: an RGB image written
    without colour metadata). `name` is the file's, for the advice."""
    array = np.squeeze(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise TiffRefused(
            "shape", f"expected a 2-D image or a stack of 2-D frames, found shape {array.shape}"
        )
    height, width = array.shape[1:]
    if width in (3, 4) and height > width:
        raise TiffRefused(
            "shape",
            f"frames of {height}x{width} pixels, shape {array.shape}: the last axis looks like "
            f"{width} colour samples per pixel (RGB{'A' if width == 4 else ''}), not an image; "
            "save one channel as a grey-scale TIFF first (Python: "
            f"tifffile.imwrite('channel.tif', tifffile.imread('{name}')[..., 0]))",
        )
    return array


def _read_tolerant(path: Path) -> tuple[np.ndarray, ImageMetadata]:
    """The first image series of a TIFF and its metadata; TiffRefused when its pixels are
    colour (photometric RGB, palette..., or several samples per pixel) or it holds several
    channels."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        sizes = dict(zip(series.axes, series.shape, strict=True))
        photometric = int(tif.pages.first.photometric)
        samples = sizes.get("S", 1)
        if photometric in COLOUR_PHOTOMETRICS or samples > 1:
            kind = COLOUR_PHOTOMETRICS.get(photometric, f"{samples} samples per pixel")
            what = f"{kind}, {samples} samples per pixel" if samples > 1 else kind
            planar = series.axes.index("S") < series.axes.index("Y") if samples > 1 else False
            grey_frames = (
                f"; if these are {samples} grey-scale frames, the file only says RGB: write it "
                "again with tifffile.imwrite(path, data, photometric='minisblack')"
                if planar
                else ""
            )
            how = (
                f"save one channel as a grey-scale TIFF first ({SPLIT_HINT}; Python: "
                f"tifffile.imwrite('channel.tif', tifffile.imread('{path.name}')"
                f"{_index(series.axes, 'S')}))"
                if samples > 1
                else "convert it to grey-scale first (Fiji: Image > Type > 8-bit or 16-bit)"
            )
            raise TiffRefused(
                "colour",
                f"a colour image ({what}, axes {series.axes}, shape {series.shape}); "
                f"pn2v-live denoises grey-scale frames of one channel: {how}{grey_frames}",
            )
        channels = sizes.get("C", 1)
        others = [axis for axis in "TZQI" if sizes.get(axis, 1) > 1]
        if channels > 1 and not tif.is_imagej and not others:
            # An OME-TIFF of C planes only: what tifffile writes for any 3-D array saved as
            # *.ome.tif without axes, so most likely frames; a real multi-channel image is told.
            log.warning(
                "%s: axes %s: reading its %d channels as %d frames; if they are channels, "
                "denoise one at a time (%s)",
                path, series.axes, channels, channels, SPLIT_HINT,
            )  # fmt: skip
        elif channels > 1:
            raise TiffRefused(
                "shape",
                f"{channels} channels (axes {series.axes}, shape {series.shape}); "
                "pn2v-live denoises one channel at a time: save the channel to denoise as its "
                f"own TIFF first ({SPLIT_HINT}; Python: tifffile.imwrite('channel.tif', "
                f"tifffile.imread('{path.name}'){_index(series.axes, 'C')}))",
            )
        return series.asarray(), read_metadata(tif)


def _index(axes: str, axis: str) -> str:
    """Python indexing that picks item 0 of `axis` among `axes`: "[..., 0]" or "[:, 0]"."""
    position = axes.index(axis)
    if position == len(axes) - 1:
        return "[..., 0]"
    return "[" + ", ".join([":"] * position + ["0"]) + "]"


def _read_strict(path: Path) -> tuple[np.ndarray, ImageMetadata]:
    """All pages of one complete file of grey-scale frames and its metadata (not yet squeezed)."""
    size = path.stat().st_size
    if size == 0:
        raise TiffRefused("empty", "file is empty")
    if not _has_tiff_header(path):
        raise TiffRefused("not_image", "not a TIFF file (no TIFF header)")
    problems = _TifffileProblems()
    try:
        with problems, tifffile.TiffFile(path, _multifile=False) as tif:
            for page in tif.pages:
                ends = np.add(page.dataoffsets, page.databytecounts, dtype=np.int64)
                if len(ends) and ends.max() > size:
                    raise TiffRefused(
                        "truncated", f"page data run past the end of the file ({size} B)"
                    )
            series, sizes = _layout(tif)
            appended = series > 1 and _appended(tif)
            if series != 1 and not appended:
                raise TiffRefused("layout", f"holds {series} image series, expected one")
            for axis, count in sizes.items():
                if axis not in FRAME_AXES and count > 1:
                    what = PLANE_NAMES.get(axis, f"planes along axis {axis}")
                    raise TiffRefused(
                        "shape",
                        f"holds {count} {what}; expected one grayscale plane per frame (save "
                        "one channel per file, e.g. Fiji: Image > Color > Split Channels)",
                    )
            if appended:
                data = np.concatenate([s.asarray().reshape(-1, *s.shape[-2:]) for s in tif.series])
            else:
                data = tif.series[0].asarray()
            metadata = read_metadata(tif)
    except TiffRefused:
        raise
    except Exception as error:  # tifffile and its codecs raise many types for damaged files
        if isinstance(error, OSError) and error.errno is not None:
            raise  # the file system failed, not the file
        raise TiffRefused(
            "truncated", f"unreadable TIFF ({type(error).__name__}: {error})"
        ) from error
    if problems.messages:
        raise TiffRefused("truncated", f"damaged TIFF: {problems.messages[0]}")
    return data, metadata


def _has_tiff_header(path: Path) -> bool:
    """Whether the file starts with a (Big)TIFF header, either byte order."""
    with path.open("rb") as file:
        return file.read(4) in TIFF_MAGIC


def _layout(tif: tifffile.TiffFile) -> tuple[int, dict[str, int]]:
    """The number of image series in this file and the axis sizes of the first. tifffile reads a
    file of a multi-file OME-TIFF set as a plain page sequence, so for it they come from the
    OME-XML's Images with planes in this file (`_images_here`)."""
    sizes = dict(zip(tif.series[0].axes, tif.series[0].shape, strict=True))
    if tif.is_ome and tif.series[0].kind != "ome":
        own = ElementTree.fromstring(tif.ome_metadata)
        images = _images_here(own, Path(tif.filehandle.dirname))
        if images:
            sizes.update(_plane_sizes(images[0]))
            return len(images), sizes
    return len(tif.series), sizes


def _images_here(own: ElementTree.Element, folder: Path) -> list[ElementTree.Element]:
    """The OME Image elements with planes in one file of a multi-file set: those whose TiffData
    name the file's UUID, or all when none does (one file per position names only its own).
    They come from the file's own OME-XML or, for a BinaryOnly file, from the set's metadata
    file in `folder` ([] while that cannot be read)."""
    images = own.findall("{*}Image")
    binary_only = own.find("{*}BinaryOnly")
    if not images and binary_only is not None:
        images = _set_images(folder / Path(binary_only.get("MetadataFile", "")).name)
    uuid = own.get("UUID")
    here = [image for image in images if any(u.text == uuid for u in image.findall(".//{*}UUID"))]
    return here or images


def _set_images(path: Path) -> list[ElementTree.Element]:
    """The Image elements of a multi-file set's metadata file (a TIFF of the set, or a companion
    .ome XML file); [] when it cannot be read."""
    try:
        if _has_tiff_header(path):
            with _TifffileProblems.elsewhere(), tifffile.TiffFile(path, _multifile=False) as master:
                xml = master.ome_metadata or ""
        else:
            xml = path.read_text(errors="replace")
        return ElementTree.fromstring(xml).findall("{*}Image")
    except (OSError, ElementTree.ParseError, tifffile.TiffFileError, ValueError):
        return []


def _plane_sizes(image: ElementTree.Element) -> dict[str, int]:
    """{"C": channels, "Z": z-planes} of an OME-XML Image element."""
    pixels = image.find("{*}Pixels")
    return {axis: int(pixels.get(f"Size{axis}", 1)) for axis in "CZ"} if pixels is not None else {}


def _appended(tif: tifffile.TiffFile) -> bool:
    """Whether the series are frames appended call by call (tifffile's `imwrite(path, frame,
    append=True)` starts a series per call): all tifffile-shaped, grayscale, of one dtype and
    frame shape. They are then read as one stack, in file order."""
    return all(s.kind == "shaped" and set(s.axes) <= set(FRAME_AXES) for s in tif.series) and (
        len({(s.dtype, s.shape[-2:]) for s in tif.series}) == 1
    )


class _TifffileProblems(logging.Handler):
    """Collects what tifffile logs at WARNING or above while this thread reads one file: not
    what other threads' reads log meanwhile, nor what this thread logs while it reads another
    file of the set (`elsewhere`)."""

    _active = threading.local()  # .collector: where this thread's tifffile records go, or None

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # runs in the thread that logged
        if getattr(self._active, "collector", None) is self:
            self.messages.append(record.getMessage())

    @classmethod
    @contextmanager
    def elsewhere(cls) -> Iterator[None]:
        """While this thread reads another file than the one whose problems are collected."""
        collector, cls._active.collector = getattr(cls._active, "collector", None), None
        try:
            yield
        finally:
            cls._active.collector = collector

    def __enter__(self) -> _TifffileProblems:
        self._active.collector = self
        logging.getLogger("tifffile").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tifffile").removeHandler(self)
        self._active.collector = None
