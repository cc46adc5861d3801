"""Reading and writing image files: TIFF/OME-TIFF stacks, PNG, and folders of frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pn2v_live.errors import UserError
from pn2v_live.storage.tiff_metadata import ImageMetadata
from pn2v_live.storage.tiff_reader import SPLIT_HINT, TiffRefused, as_frames, read_tiff

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


# PNG modes of one grey value per pixel; RGB, RGBA, LA, P (palette), CMYK... are colour.
GREY_PNG_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")


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
        origin = metadata.sensor_origin
        return np.concatenate(frames), ImageMetadata(
            metadata.physical, metadata.channel, "T", origin
        )
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
                stack, metadata = as_frames(np.asarray(image), path.name), ImageMetadata()
        else:
            stack, metadata = read_tiff(path)
    except UserError:
        raise
    except TiffRefused as refused:
        raise UserError(f"{path}: {refused}") from None
    except Exception as error:  # tifffile/PIL raise many types for corrupt files
        raise UserError(f"{path}: not a readable image ({error})") from error
    return _finite(stack, path), metadata


def _finite(stack: np.ndarray, path: Path) -> np.ndarray:
    """`stack` unless it holds NaN or infinite values."""
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
