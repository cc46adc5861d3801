"""The OME-Zarr acquisition store: layout, growth, reopening, denoised versions, readers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import dask.array as da
import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from pn2v_live.errors import UserError
from pn2v_live.storage.layout import validate_name
from pn2v_live.storage.store import Store


def frames(n: int, shape=(32, 48), dtype="uint16", seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (n, *shape)).astype(dtype)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_frames_round_trip_and_open_in_ome_zarr_and_dask(tmp_path, zarr_format):
    data = frames(5)
    store = Store(tmp_path, zarr_format=zarr_format)
    acq = store.create("cells_01", (32, 48), "uint16")
    for t, frame in enumerate(data):
        acq.write_raw(t, frame)
    acq.close(expected_frames=5)
    store.close()

    reopened = Store(tmp_path, zarr_format=zarr_format).acquisition("cells_01")
    assert reopened.valid_t == 5 and reopened.closed and reopened.expected_frames == 5
    np.testing.assert_array_equal(np.stack([reopened.read_raw(t) for t in range(5)]), data)

    nodes = list(Reader(parse_url(str(tmp_path / "cells_01.ome.zarr" / "raw")))())
    image = nodes[0]
    assert image.data[0].shape == (5, 1, 1, 32, 48)
    assert image.data[0].dtype == np.uint16
    assert [axis["name"] for axis in image.metadata["axes"]] == ["t", "c", "z", "y", "x"]
    np.testing.assert_array_equal(np.asarray(image.data[0])[:, 0, 0], data)

    lazy = da.from_zarr(str(tmp_path / "cells_01.ome.zarr" / "denoised" / "0"))
    assert lazy.shape == (5, 1, 1, 32, 48) and lazy.dtype == np.float32
    assert lazy.chunksize == (1, 1, 1, 32, 48)

    version_key = "multiscales" if zarr_format == 2 else "ome"
    group = zarr.open_group(tmp_path / "cells_01.ome.zarr" / "raw", mode="r")
    assert version_key in group.attrs
    assert group.metadata.zarr_format == zarr_format


def test_one_chunk_file_per_frame_and_old_chunks_untouched(tmp_path):
    acq = Store(tmp_path).create("a", (16, 16), "uint8")
    data = frames(3, (16, 16), "uint8")
    acq.write_raw(0, data[0])
    chunk = tmp_path / "a.ome.zarr" / "raw" / "0" / "0" / "0" / "0" / "0" / "0"
    before = (chunk.stat().st_ino, chunk.stat().st_mtime_ns)
    acq.write_raw(1, data[1])
    acq.write_raw(2, data[2])
    assert (chunk.stat().st_ino, chunk.stat().st_mtime_ns) == before
    chunks = sorted(p.relative_to(chunk.parents[4]) for p in chunk.parents[4].rglob("*/0/0/0/0"))
    assert [str(p) for p in chunks] == ["0/0/0/0/0", "1/0/0/0/0", "2/0/0/0/0"]


def test_valid_t_counts_contiguous_frames_and_attribute_is_published(tmp_path):
    acq = Store(tmp_path).create("a", (8, 8), "uint16")
    data = frames(6, (8, 8))
    for t in (0, 1, 3, 5):
        acq.write_raw(t, data[t])
    assert acq.valid_t == 2 and acq.stored_frames() == [0, 1, 3, 5]
    acq.flush()
    attrs = json.loads((tmp_path / "a.ome.zarr" / ".zattrs").read_text())["pn2v_live"]
    assert attrs["valid_t"] == 2
    assert zarr.open_array(tmp_path / "a.ome.zarr" / "raw" / "0", mode="r").shape[0] == 6
    acq.write_raw(2, data[2])
    acq.write_raw(4, data[4])
    acq.flush()
    attrs = json.loads((tmp_path / "a.ome.zarr" / ".zattrs").read_text())["pn2v_live"]
    assert acq.valid_t == 6 and attrs["valid_t"] == 6


def test_time_of_the_newest_frame_is_kept_across_reopening(tmp_path):
    store = Store(tmp_path)
    acq = store.create("a", (8, 8), "uint16")
    assert acq.last_frame_at is None
    before = time.time()
    acq.write_raw(0, frames(1, (8, 8))[0])
    stored_at = acq.last_frame_at
    assert before - 0.01 <= stored_at <= time.time() + 0.01
    store.close()
    time.sleep(0.05)
    again = Store(tmp_path)  # opening and closing again is not a new frame
    assert again.acquisition("a").last_frame_at == stored_at
    again.close()
    attrs = json.loads((tmp_path / "a.ome.zarr" / ".zattrs").read_text())["pn2v_live"]
    assert attrs["last_frame_at"] == stored_at


def test_denoised_versions_frames_to_denoise_and_without_twin_newest_first(tmp_path):
    store = Store(tmp_path)
    acq = store.create("a", (8, 8), "uint16")
    for t, frame in enumerate(frames(4, (8, 8))):
        acq.write_raw(t, frame)
    assert acq.frames_to_denoise(1) == [3, 2, 1, 0] == acq.frames_without_twin()
    assert acq.read_denoised(2) is None and acq.denoised_version(2) is None
    den = np.full((8, 8), 1.5, np.float32)
    acq.write_denoised(2, den, model_version=1)
    acq.write_denoised(3, den * 2, model_version=2)
    assert acq.frames_to_denoise(1) == [1, 0] == acq.frames_without_twin()
    assert acq.frames_to_denoise(2) == [2, 1, 0]
    store.close()
    again = Store(tmp_path, writer=True).acquisition("a")
    np.testing.assert_array_equal(again.read_denoised(3), den * 2)
    assert again.denoised_version(2) == 1 and again.frames_to_denoise(2) == [2, 1, 0]
    assert again.frames_without_twin() == [1, 0]  # rebuilt from the ledger on opening
    again.write_raw(5, frames(1, (8, 8))[0])
    again.write_denoised(0, den, model_version=2)
    assert again.frames_without_twin() == [5, 1]
    with pytest.raises(KeyError):
        again.write_denoised(9, den, model_version=1)


def test_create_opens_matching_and_refuses_mismatch(tmp_path):
    store = Store(tmp_path)
    first = store.create("a", (8, 8), "uint16")
    assert store.create("a", (8, 8), "uint16") is first
    with pytest.raises(ValueError, match="holds"):
        store.create("a", (8, 9), "uint16")
    with pytest.raises(ValueError, match="holds"):
        Store(tmp_path).create("a", (8, 8), "uint8")
    with pytest.raises(ValueError, match="raw frames"):
        store.create("b", (8, 8), "float64")
    with pytest.raises(ValueError, match="is \\(8, 9\\)"):
        first.write_raw(0, np.zeros((8, 9), np.uint16))
    with pytest.raises(KeyError):
        store.acquisition("missing")
    assert store.acquisitions() == ["a"]


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 129, "a..b", "a\x00", 5])
def test_hostile_names_refused(tmp_path, name):
    with pytest.raises(ValueError, match="not allowed"):
        validate_name(name)
    with pytest.raises(ValueError):
        Store(tmp_path).create(name, (8, 8), "uint16")
    assert not list(tmp_path.glob("*.ome.zarr")) and not (tmp_path.parent / "etc.ome.zarr").exists()


def test_reopen_forgets_frames_whose_chunk_is_missing(tmp_path):
    store = Store(tmp_path)
    acq = store.create("a", (8, 8), "uint16")
    data = frames(3, (8, 8))
    for t, frame in enumerate(data):
        acq.write_raw(t, frame)
    store.close()
    (tmp_path / "a.ome.zarr" / "raw" / "0" / "1" / "0" / "0" / "0" / "0").unlink()
    chunk_folder = tmp_path / "a.ome.zarr" / "raw" / "0" / "2" / "0" / "0" / "0"
    stale, fresh = chunk_folder / "0.abc.partial", chunk_folder / "0.def.partial"
    stale.write_bytes(b"half a chunk, from a crash")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    fresh.write_bytes(b"being written by a live process")
    reader = Store(tmp_path).acquisition("a")
    assert reader.stored_frames() == [0, 2] and reader.valid_t == 1
    assert stale.exists() and fresh.exists()  # a reader never deletes what a writer may finish
    again = Store(tmp_path, writer=True).acquisition("a")
    assert again.stored_frames() == [0, 2] and again.valid_t == 1
    assert not stale.exists() and not fresh.exists()  # the one writer knows nobody else writes
    assert again._claim(1) and not again._claim(2)


def test_a_frame_stored_again_is_denoised_again(tmp_path):
    """The denoised twin of a frame whose raw chunk was lost, or of an acquisition whose folder
    was deleted and whose name came back, must not pass for the new frame's twin."""
    store = Store(tmp_path, writer=True)
    acq = store.create("a", (8, 8), "uint16")
    old, new = frames(2, (8, 8))
    for t in range(2):
        acq.write_raw(t, old)
        acq.write_denoised(t, np.full((8, 8), 99.0, np.float32), model_version=1)
    store.close()
    (tmp_path / "a.ome.zarr" / "raw" / "0" / "1" / "0" / "0" / "0" / "0").unlink()
    store = Store(tmp_path, writer=True)
    acq = store.acquisition("a")
    assert acq.frames_without_twin() == [] and acq.denoised_version(1) is None
    acq.write_raw(1, new)  # resent after the power cut
    assert acq.frames_without_twin() == [1] and acq.read_denoised(1) is None
    assert acq.denoised_version(0) == 1
    store.close()
    shutil.rmtree(tmp_path / "a.ome.zarr")
    store = Store(tmp_path, writer=True)
    store.source_items("folder").reserve("/scope/a/img.tif", "a", 10, 1, 2)  # an old file's range
    again = store.create("a", (8, 8), "uint16")
    assert store.recorded_frames("a") == [] and store.recorded_twins("a") == {}
    assert store.source_items("folder").reserve("/scope/a/next.tif", "a", 10, 1, 1) == 0
    again.write_raw(0, new)
    assert again.frames_without_twin() == [0] and again.read_denoised(0) is None
    store.close()


def test_a_folder_deleted_while_open_is_let_go_and_its_name_starts_afresh(tmp_path):
    """An acquisition's folder deleted while the daemon holds it open (among those asked for
    last, and in a stage's hands), then frames sent under its name again: they make a new
    acquisition that readers open whole, with no trace of the old one, and the old object the
    stage still holds can write neither frames nor metadata into it."""
    old, new = frames(3, (8, 8)), frames(2, (8, 8), seed=1)
    store = Store(tmp_path, writer=True)
    held = store.acquisition_for("run", (8, 8), np.uint16)  # as a stage holds it
    for t in range(3):
        assert store.put_raw("run", t, old[t]) == "stored"
    held.write_denoised(0, old[0].astype(np.float32), model_version=1)
    shutil.rmtree(store.path("run"))
    for t in range(2):  # the same frame numbers, other pixels: stored, neither kept nor refused
        assert store.put_raw("run", t, new[t]) == "stored"
    again = store.acquisition("run")
    assert again is not held and again.identity != held.identity
    with pytest.raises(FileNotFoundError, match="folder was deleted"):
        held.write_denoised(1, old[1].astype(np.float32), model_version=1)
    with pytest.raises(FileNotFoundError):
        held.write_raw(2, old[2])
    assert held.flush() is False  # its metadata is not written over the new acquisition's
    assert again.stored_frames() == [0, 1] and again.frames_without_twin() == [1, 0]
    store.close()
    reopened = Store(tmp_path).acquisition("run")
    assert reopened.valid_t == 2 and reopened.denoised_version(0) is None
    np.testing.assert_array_equal([reopened.read_raw(t) for t in range(2)], new)
    assert zarr.open_array(store.path("run") / "raw" / "0", mode="r").shape[0] == 2


def test_a_second_writer_process_is_refused_until_the_first_closes(tmp_path):
    first = Store(tmp_path, writer=True)
    open_writer = (
        "import sys; from pn2v_live.storage.store import Store; "
        "Store(sys.argv[1], writer=True).close()"
    )
    refused = subprocess.run(
        [sys.executable, "-c", open_writer, tmp_path], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert f"already being written by another pn2v-live process (pid {os.getpid()})" in (
        refused.stderr
    )
    with pytest.raises(UserError, match="already being written"):
        Store(tmp_path, writer=True)  # the lock is per open file, so this process too
    Store(tmp_path).close()  # readers are always welcome
    first.close()
    accepted = subprocess.run(
        [sys.executable, "-c", open_writer, tmp_path], capture_output=True, text=True, timeout=60
    )
    assert accepted.returncode == 0, accepted.stderr


def test_concurrent_writers_store_every_frame(tmp_path):
    acq = Store(tmp_path).create("a", (16, 16), "uint16")
    data = frames(120, (16, 16))

    def write(ts):
        for t in ts:
            acq.write_raw(t, data[t])

    threads = [threading.Thread(target=write, args=(range(k, 120, 3),)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    acq.flush()
    assert acq.valid_t == 120
    on_disk = zarr.open_array(tmp_path / "a.ome.zarr" / "raw" / "0", mode="r")
    assert on_disk.shape[0] == 120
    np.testing.assert_array_equal(on_disk[:, 0, 0], data)


def test_opening_the_store_again_while_it_is_written_changes_nothing(tmp_path):
    writer = Store(tmp_path).create("live", (8, 8), "uint16")
    data = frames(10, (8, 8))
    for t in range(5):
        writer.write_raw(t, data[t])
    raw = tmp_path / "live.ome.zarr" / "raw" / "0"
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))
    length = zarr.open_array(raw, mode="r").shape[0]
    assert length > 5  # grown ahead of the frames, as while acquiring
    reader_store = Store(tmp_path)  # e.g. a notebook beside the daemon
    assert reader_store.acquisition("live").valid_t == 5
    reader_store.close()
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before
    assert zarr.open_array(raw, mode="r").shape[0] == length
    for t in range(5, 10):
        writer.write_raw(t, data[t])
    writer.flush()
    np.testing.assert_array_equal(zarr.open_array(raw, mode="r")[:, 0, 0], data)


def test_a_writer_reopening_aligns_arrays_left_unequal_by_a_kill_between_resizes(tmp_path):
    store = Store(tmp_path, writer=True)
    acq = store.create("a", (8, 8), "uint16")
    for t, frame in enumerate(frames(3, (8, 8))):
        acq.write_raw(t, frame)
    store.close()
    zarr.open_array(tmp_path / "a.ome.zarr" / "denoised" / "0").resize((1, 1, 1, 8, 8))
    again = Store(tmp_path, writer=True).acquisition("a")
    again.write_denoised(2, np.ones((8, 8), np.float32), model_version=1)  # IndexError before
    np.testing.assert_array_equal(again.read_denoised(2), np.ones((8, 8), np.float32))
