"""How an acquisition lies on disk: one OME-Zarr group, growing one frame at a time.

Layout under the data root::

    <root>/ingest-ledger.sqlite          SQLite WAL ledger (see ledger.py)
    <root>/<name>.ome.zarr/              group; attrs["pn2v_live"] = {valid_t, closed,
                                         last_frame_at (unix s), expected_frames,
                                         sensor_origin [row, column] when known},
                                         attrs "labels" = ["raw", "denoised"] (see below)
        raw/0        (T, 1, 1, Y, X) camera dtype (uint8/uint16), OME-NGFF multiscale image
        denoised/0   (T, 1, 1, Y, X) float32, same layout; fill value 0 until denoised

Axes are t, c, z, y, x, with the physical scale (frame interval in seconds, z step and pixel size
in micrometres) as the images' `scale` transformation and axis units where known (`Physical`);
each chunk is one frame plane (1, 1, 1, Y, X), so appending a frame writes one new chunk file and
never rewrites an old one. Chunk files are written atomically (temporary file + rename) by zarr's
LocalStore, so readers in other processes (napari, Fiji, dask) see either a whole frame or the
fill value.

Default is OME-NGFF 0.4 on Zarr format 2; `zarr_format=3` writes OME-NGFF 0.5 on Zarr v3.

The acquisition's group lists its two images in the OME-NGFF `labels` key, the one convention
by which ome-zarr-py's `Reader` (napari-ome-zarr) descends from a group into several sibling
images: opening `<name>.ome.zarr` yields the images raw and denoised, each named and scaled
(they carry no `image-label` metadata, so readers show them as images, not label masks).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.sync import sync

from pn2v_live.storage.atomic import sync_folder, sync_paths
from pn2v_live.storage.physical import Physical

SUFFIX = ".ome.zarr"
RAW_DTYPES = ("uint8", "uint16")
AXES = ("t", "c", "z", "y", "x")
IMAGES = ("raw", "denoised")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(name: object) -> str:
    """Return `name` if it is a safe acquisition name, else raise ValueError saying why.

    Safe: 1-128 characters from letters, digits, '.', '_', '-', starting with a letter or digit,
    no '..' (so it can never leave the data root) and not ending in '.ome.zarr'.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"acquisition name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit, without '..'"
        )
    if name.endswith(SUFFIX):
        raise ValueError(f"acquisition name {name!r} must not end in {SUFFIX}")
    return name


def _compressor(zarr_format: int) -> object:
    """Blosc lz4 with byte shuffle: the fastest Blosc codec, so compression keeps up with large
    camera frames; ratio about 1.75 on 16-bit camera data (throughput: docs/benchmarks.md)."""
    if zarr_format == 2:
        return numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def create_group(
    path: Path,
    frame_shape: tuple[int, int],
    dtype: np.dtype,
    physical: Physical,
    zarr_format: int,
) -> None:
    """Build an empty acquisition of (Y, X) `frame_shape` frames beside `path` and rename it
    into place, so readers never see a half-made one (a leftover from a crash mid-creation is
    replaced)."""
    building = path.with_name(f".{path.name}.creating")
    shutil.rmtree(building, ignore_errors=True)
    group = zarr.open_group(building, mode="w", zarr_format=zarr_format)
    for image, image_dtype, fill in (("raw", dtype, 0), ("denoised", np.float32, 0.0)):
        sub = group.create_group(image)
        options = (
            {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
            if zarr_format == 2
            else {"dimension_names": AXES}
        )
        sub.create_array(
            "0",
            shape=(0, 1, 1, *frame_shape),
            chunks=(1, 1, 1, *frame_shape),
            dtype=image_dtype,
            fill_value=fill,
            compressors=_compressor(zarr_format),
            **options,
        )
        write_image_metadata(sub, image, physical)
    list_images(group)
    group.attrs["pn2v_live"] = {"valid_t": 0, "closed": False}
    sync_paths([*building.rglob("*"), building])  # all of it on disk before it appears
    building.rename(path)
    sync_folder(path.parent)


def chunk_file(array: zarr.Array, t: int) -> Path:
    """The chunk file of frame `t` of `array` (one chunk per frame plane)."""
    root = Path(array.store_path.store.root) / array.store_path.path
    return root / array.metadata.encode_chunk_key((t, 0, 0, 0, 0))


def durable_paths(array: zarr.Array, t: int) -> list[Path]:
    """What to fsync so frame `t`'s chunk of `array` survives a power cut: the chunk file and
    every folder from the array's own down to the chunk's (each frame's key, e.g. `t/0/0/0/0`,
    makes new folders)."""
    root = Path(array.store_path.store.root) / array.store_path.path
    chunk = chunk_file(array, t)
    paths = [chunk]
    folder = chunk.parent
    while folder != root and root in folder.parents:
        paths.append(folder)
        folder = folder.parent
    return [*paths, root]


def resize_arrays(arrays: tuple[zarr.Array, ...], frames: int) -> None:
    """Set the arrays' length to `frames`, rewriting their metadata only.

    zarr's own shrink lists every chunk of the old shape to delete those outside (seconds per
    trim for long acquisitions); no chunk of a stored frame lies outside here, and one left
    there by a crash is overwritten when its frame arrives.
    """
    for array in arrays:
        sync(array._async_array.resize((frames, *array.shape[1:]), delete_outside_chunks=False))


def _ngff_format(group: zarr.Group) -> object:
    """The OME-NGFF version of the store's Zarr format: 0.4 on format 2, 0.5 on format 3."""
    # ome-zarr pulls in dask and more (~2 s); only writing metadata needs it.
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if group.metadata.zarr_format == 2 else FormatV05()


def write_image_metadata(image: zarr.Group, name: str, physical: Physical) -> None:
    """(Re)write the OME-NGFF multiscales metadata of image group `image` (one level, "0"): its
    `name`, axes t, c, z, y, x with units and `physical`'s scale."""
    from ome_zarr.writer import write_multiscales_metadata

    scale = [{"type": "scale", "scale": physical.ngff_scale()}]
    write_multiscales_metadata(
        image,
        [{"path": "0", "coordinateTransformations": scale}],
        fmt=_ngff_format(image),
        axes=physical.ngff_axes(),
        name=name,
    )


def read_physical(image: zarr.Group) -> Physical:
    """The physical sizes in image group `image`'s OME-NGFF metadata; all unknown when it has
    none or they cannot be read (the frames are still usable)."""
    attrs = image.attrs.asdict()
    try:
        multiscale = attrs.get("ome", attrs)["multiscales"][0]
        transforms = multiscale["datasets"][0]["coordinateTransformations"]
        [scale] = [t["scale"] for t in transforms if t.get("type") == "scale"]
        return Physical.from_ngff(multiscale["axes"], scale)
    except (KeyError, IndexError, TypeError, ValueError):
        return Physical()


def list_images(group: zarr.Group) -> None:
    """List the images in the acquisition group's OME-NGFF `labels` key (see the module doc),
    unless they are listed."""
    attrs = group.attrs.asdict()
    if attrs.get("ome", attrs).get("labels") == list(IMAGES):
        return
    from ome_zarr.writer import add_metadata

    fmt = _ngff_format(group)
    listing = {"labels": list(IMAGES)}
    if fmt.version != "0.4":
        listing["version"] = fmt.version  # NGFF 0.5: every "ome" attribute names its version
    add_metadata(group, listing, fmt=fmt)


def array_length(folder: Path) -> int | None:
    """The first dimension of the zarr array in `folder` (format 2 or 3), read from its metadata
    file alone; None when that cannot be read."""
    try:
        return int(metadata_document(folder, "array")["shape"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def metadata_document(folder: Path, kind: str) -> dict:
    """A zarr group's attributes (`kind` "") or an array's metadata ("array") in `folder`,
    format 2 or 3, read from its file alone (no zarr); raises OSError or ValueError when it
    cannot be read."""
    try:
        return json.loads((folder / (".zarray" if kind else ".zattrs")).read_text())
    except FileNotFoundError:
        document = json.loads((folder / "zarr.json").read_text())
    return document if kind else document.get("attributes", {})
