"""Reading and writing image files: TIFF/OME-TIFF stacks, PNG, and folders of frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pn2v_live.errors import UserError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def read_stack(path: str | Path) -> np.ndarray:
    """Read a 2-D image, a multi-page stack or a folder of 2-D frames as (T, Y, X), dtype kept.

    Folders are read in sorted file-name order. Raises UserError for anything unreadable.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"{path}: folder holds no .tif/.tiff/.png frames")
        frames = [read_stack(f) for f in files]
        shapes = {f.shape[1:] for f in frames}
        dtypes = {f.dtype for f in frames}
        if len(shapes) > 1 or len(dtypes) > 1:
            raise UserError(
                f"{path}: frames differ in shape {sorted(map(str, shapes))} "
                f"or dtype {sorted(map(str, dtypes))}; put one acquisition per folder"
            )
        return np.concatenate(frames)
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder")
    try:
        if path.suffix.lower() == ".png":
            array = np.asarray(Image.open(path))
        else:
            array = tifffile.imread(path)
    except Exception as error:  # tifffile/PIL raise many types for corrupt files
        raise UserError(f"{path}: not a readable image ({error})") from error
    return _as_tyx(array, path)


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


def read_image(path: str | Path) -> np.ndarray:
    """Read exactly one 2-D image (Y, X)."""
    stack = read_stack(path)
    if stack.shape[0] != 1:
        raise UserError(f"{path}: expected one 2-D image, found {stack.shape[0]} frames")
    return stack[0]


def write_tiff(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as a (multi-page) TIFF, zlib-compressed, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, compression="zlib")
