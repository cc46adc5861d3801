"""Reading and writing image files: TIFF/OME-TIFF stacks, PNG, and folders of frames."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pn2v_live.errors import UserError
from pn2v_live.storage.tiff_metadata import ImageMetadata, read_metadata

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


# PNG modes of one grey value per pixel; RGB, RGBA, LA, P (palette), CMYK... are colour.
GREY_PNG_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")
# TIFF photometric interpretations that are not one grey value per pixel.
COLOUR_PHOTOMETRICS = {2: "RGB", 3: "palette colour", 5: "CMYK", 6: "YCbCr", 8: "CIELab"}
SPLIT_HINT = "Fiji: Image > Color > Split Channels, then save the one to denoise"


def read_stack(path: str | Path) -> np.ndarray:
    """Read a 2-D image, a multi-page stack or a folder of 2-D frames as (T, Y, X), dtype kept.

    Folders are read in sorted file-name order. Raises UserError for anything unreadable, and
    for what is not grey-scale frames: colour (RGB/RGBA, palette) images, several channels per
    frame, frames 3 or 4 pixels wide (colour samples read as pixels), NaN or infinite values.
    """
    return read_stack_metadata(path)[0]


def read_stack_metadata(path: str | Path) -> tuple[np.ndarray, ImageMetadata]:
    """`read_stack` and the physical metadata of the (first) TIFF read (`tiff_metadata`); a PNG
    has none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no .tif/.tiff/.png frames")
        first, metadata = read_stack_metadata(files[0])
        frames = [first, *(read_stack(f) for f in files[1:])]
        shapes = {f.shape[1:] for f in frames}
        dtypes = {f.dtype for f in frames}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise UserError(
                f"{path}: frames differ in shape {sorted(map(str, shapes))} "
                f"or dtype {sorted(map(str, dtypes))}; put one acquisition per folder"
            )
        return np.concatenate(frames), ImageMetadata(metadata.physical, metadata.channel)
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as image:
                if image.mode not in GREY_PNG_MODES:
                    raise UserError(
                        f"{path}: a colour image (PNG mode {image.mode}); pn2v-live denoises "
                        f"grey-scale frames of one channel: save one channel as a grey-scale "
                        f"TIFF or PNG first ({SPLIT_HINT})"
                    )
                array, metadata = np.asarray(image), ImageMetadata()
        else:
            array, metadata = _read_tiff(path)
    except UserError:
        raise
    except Exception as error:  # tifffile/PIL raise many types for corrupt files
        raise UserError(f"{path}: not a readable image ({error})") from error
    return _checked(_as_tyx(array, path), path), metadata


def _read_tiff(path: Path) -> tuple[np.ndarray, ImageMetadata]:
    """The first image series of a TIFF and its metadata; UserError when its pixels are colour
    (photometric RGB, palette..., or several samples per pixel) or it holds several channels."""
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
            raise UserError(
                f"{path}: a colour image ({what}, axes {series.axes}, shape {series.shape}); "
                f"pn2v-live denoises grey-scale frames of one channel: {how}{grey_frames}"
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
            raise UserError(
                f"{path}: {channels} channels (axes {series.axes}, shape {series.shape}); "
                "pn2v-live denoises one channel at a time: save the channel to denoise as its "
                f"own TIFF first ({SPLIT_HINT}; Python: tifffile.imwrite('channel.tif', "
                f"tifffile.imread('{path.name}'){_index(series.axes, 'C')}))"
            )
        return series.asarray(), read_metadata(tif)


def _index(axes: str, axis: str) -> str:
    """Python indexing that picks item 0 of `axis` among `axes`: "[..., 0]" or "[:, 0]"."""
    position = axes.index(axis)
    if position == len(axes) - 1:
        return "[..., 0]"
    return "[" + ", ".join([":"] * position + ["0"]) + "]"


def _as_tyx(array: np.ndarray, path: Path) -> np.ndarray:
    """Squeeze singleton axes and return (T, Y, X); RGB or 4-D+ data is refused."""
    array = np.squeeze(array)
    if array.ndim == 2:
        return array[np.newaxis]
    if array.ndim == 3:
        return array
    raise UserError(
        f"{path}: expected a 2-D image or a stack of 2-D frames, found shape {array.shape}"
    )


def _checked(stack: np.ndarray, path: Path) -> np.ndarray:
    """`stack` (T, Y, X) unless its frames are 3 or 4 pixels wide (colour samples read as
    pixels: an RGB image without colour metadata) or it holds NaN or infinite values."""
    height, width = stack.shape[1:]
    if width in (3, 4) and height > width:
        raise UserError(
            f"{path}: frames of {height}x{width} pixels, shape {stack.shape}: the last axis "
            f"looks like {width} colour samples per pixel (RGB{'A' if width == 4 else ''}), not "
            "an image; save one channel as a grey-scale TIFF first "
            f"(Python: tifffile.imwrite('channel.tif', tifffile.imread('{path.name}')[..., 0]))"
        )
    if stack.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(stack)))
        if bad:
            raise UserError(
                f"{path}: {bad} of {stack.size} pixels are NaN or infinite; replace them (e.g. "
                "by the background level) before denoising or training"
            )
    return stack


def read_image(path: str | Path) -> np.ndarray:
    """Read exactly one 2-D image (Y, X)."""
    stack = read_stack(path)
    if stack.shape[0] != 1:
        raise UserError(f"{path}: expected one 2-D image, found {stack.shape[0]} frames")
    return stack[0]


def write_tiff(path: str | Path, array: np.ndarray, ome: dict | None = None) -> None:
    """Write `array` as a (multi-page) grey-scale TIFF, zlib-compressed, creating parent
    folders; an OME-TIFF with `ome`, the options of `tiff_metadata.ome_tiff_options`. Grey-scale
    said explicitly: tifffile would tag a stack of 3 or 4 frames as one RGB(A) image, which Fiji
    then shows, and `read_stack` refuses, as colour."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, compression="zlib", photometric="minisblack", **(ome or {}))


def cast_clipped(array: np.ndarray, dtype: np.dtype | str) -> tuple[np.ndarray, int]:
    """`array` as `dtype` and the number of pixels clipped: to an integer dtype rounded to the
    nearest integer and clipped to its range; to a float dtype unchanged in value (0 clipped)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return array.astype(dtype), 0
    info = np.iinfo(dtype)
    rounded = np.rint(array)
    clipped = int(np.count_nonzero((rounded < info.min) | (rounded > info.max)))
    return np.clip(rounded, info.min, info.max).astype(dtype), clipped
