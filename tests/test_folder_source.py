"""The folder watcher with a real observer, real TIFF files and a real store."""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from prometheus_client import REGISTRY

from pn2v_live.pipeline import folder_source
from pn2v_live.pipeline.folder_source import FolderSource
from pn2v_live.storage.store import Store
from pn2v_live.storage.tiff_reader import TiffRefused, read_tiff

SHAPE = (24, 32)


def stack(n: int, seed: int, dtype="uint16", shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 250, (n, *shape)).astype(dtype)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def rejected(reason: str) -> float:
    labels = {"source": "folder", "reason": reason}
    return REGISTRY.get_sample_value("pn2v_live_frames_rejected_total", labels) or 0.0


def fingerprint(folder: Path) -> dict:
    return {
        p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def watched(tmp_path):
    folder = tmp_path / "scope"
    folder.mkdir()
    return folder


def run_source(store, folder, **options):
    source = FolderSource(store, [folder], stable_seconds=0.5, rescan_seconds=1.0, **options)
    source.start()
    return source


def run_until(store, folder, **counts: int) -> None:
    """Run a source over `folder` until its `counts` reach these values, then stop it."""
    source = run_source(store, folder)
    try:
        wait_for(lambda: all(source.counts[key] == value for key, value in counts.items()))
    finally:
        source.stop()


def item_status(store, path: Path):
    item = store.source_items("folder").get(str(path))
    return None if item is None else item.status


@pytest.mark.parametrize("polling", [False, True])
def test_single_multi_page_and_ome_tiffs_stored_in_order_files_untouched(
    tmp_path, watched, polling
):
    store = Store(tmp_path / "store")
    acq_dir = watched / "cells"
    acq_dir.mkdir()
    parts = [stack(1, 0), stack(3, 1), stack(2, 2), stack(2, 3)]
    # present before the watcher starts: taken in natural name order (img_2 before img_10)
    tifffile.imwrite(acq_dir / "img_10.ome.tif", parts[2], ome=True, metadata={"axes": "TYX"})
    tifffile.imwrite(acq_dir / "img_2.tif", parts[1], photometric="minisblack")
    tifffile.imwrite(acq_dir / "img_1.tif", parts[0][0])  # single page
    source = run_source(store, watched, polling=polling)
    try:
        wait_for(lambda: source.counts["stored_frames"] == 6)
        # arriving while watched: appended after the others
        tifffile.imwrite(acq_dir / "img_11.tif", parts[3], photometric="minisblack")
        (acq_dir / "notes.txt").write_text("objective 60x")
        before = fingerprint(watched)
        wait_for(lambda: source.counts["stored_frames"] == 8)
        acq = store.acquisition("cells")
        assert acq.stored_frames() == list(range(8))
        stored = np.stack([acq.read_raw(t) for t in range(8)])
        np.testing.assert_array_equal(stored, np.concatenate(parts))
        assert fingerprint(watched) == before
        assert item_status(store, acq_dir / "img_10.ome.tif") == "stored"
        assert item_status(store, acq_dir / "notes.txt") is None
        assert source.health()["state"] == "running"
    finally:
        source.stop()


def test_bad_files_are_rejected_with_reasons_and_good_ones_still_stored(tmp_path, watched):
    store = Store(tmp_path / "store")
    acq_dir = watched / "run1"
    acq_dir.mkdir()
    good = stack(4, 3)
    tifffile.imwrite(acq_dir / "a_000.tif", good[:2])
    full = acq_dir.parent / "full.bin"
    tifffile.imwrite(full, stack(5, 9), compression="zlib")
    truncated_bytes = full.read_bytes()[: full.stat().st_size // 3]
    full.unlink()
    bad = {
        "a_001_truncated.tif": ("truncated", truncated_bytes),
        "a_002_empty.tif": ("empty", b""),
        "a_003_text.tif": ("not_image", b"this is not an image\n" * 20),
    }
    for name, (_, content) in bad.items():
        (acq_dir / name).write_bytes(content)
    tifffile.imwrite(acq_dir / "a_004_shape.tif", stack(1, 4, shape=(24, 33))[0])
    tifffile.imwrite(acq_dir / "a_005_dtype.tif", stack(1, 5, dtype="uint8")[0])
    tifffile.imwrite(acq_dir / "a_006_float.tif", stack(1, 6).astype("float64")[0])
    tifffile.imwrite(watched / "loose.tif", good[0])  # not inside an acquisition folder
    (watched / "bad name").mkdir()
    tifffile.imwrite(watched / "bad name" / "x.tif", good[0])
    tifffile.imwrite(acq_dir / "a_007.tif", good[2:])
    reasons = ["truncated", "empty", "not_image", "shape", "dtype", "pattern", "name"]
    counted = {reason: rejected(reason) for reason in reasons}

    run_until(store, watched, rejected_files=8, stored_files=2)
    acq = store.acquisition("run1")
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(4)]), good)
    assert acq.stored_frames() == [0, 1, 2, 3]
    items = store.source_items("folder")
    for name, (reason, _) in bad.items():
        item = items.get(str(acq_dir / name))
        assert item.status == "rejected" and item.reason.startswith(reason), (name, item)
    assert items.get(str(acq_dir / "a_004_shape.tif")).reason.startswith("shape")
    assert "(24, 33)" in items.get(str(acq_dir / "a_004_shape.tif")).reason
    assert items.get(str(acq_dir / "a_006_float.tif")).reason.startswith("dtype")
    assert items.get(str(watched / "loose.tif")).reason.startswith("pattern")
    assert rejected("dtype") == counted["dtype"] + 2
    for reason in ("truncated", "empty", "not_image", "shape", "pattern", "name"):
        assert rejected(reason) == counted[reason] + 1, reason
    assert store.acquisitions() == ["run1"]


def test_a_damaged_file_read_in_another_thread_does_not_reject_a_good_one(tmp_path):
    """Two threads read TIFFs at once (two FolderSources in one program, say): the page-chain
    errors tifffile logs for a damaged file in one are not counted against the other's file."""
    good = stack(5, 21)
    tifffile.imwrite(tmp_path / "good.tif", good)
    content = (tmp_path / "good.tif").read_bytes()
    (tmp_path / "damaged.tif").write_bytes(content[: len(content) // 2])
    stop, damaged_reasons = threading.Event(), []

    def read_damaged_until_stopped():
        while not stop.is_set():
            try:
                read_tiff(tmp_path / "damaged.tif", strict=True)
            except TiffRefused as error:
                damaged_reasons.append(error.reason)
            else:
                damaged_reasons.append("read")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, so the two reads interleave
    other = threading.Thread(target=read_damaged_until_stopped)
    other.start()
    try:
        reads = [read_tiff(tmp_path / "good.tif", strict=True)[0] for _ in range(200)]
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(interval)
    for frames in reads:
        np.testing.assert_array_equal(frames, good)
    assert len(damaged_reasons) > 20 and set(damaged_reasons) == {"truncated"}


def test_file_still_being_written_is_taken_only_when_complete(tmp_path, watched):
    store = Store(tmp_path / "store")
    (watched / "slow").mkdir()
    data = stack(6, 7)
    target = watched / "slow" / "movie.tif"
    tifffile.imwrite(tmp_path / "movie.tif", data)
    content = (tmp_path / "movie.tif").read_bytes()
    before = rejected("truncated")
    source = run_source(store, watched)
    try:
        with target.open("wb") as writer:  # a camera writing one file in pieces
            for start in range(0, len(content), len(content) // 8 + 1):
                writer.write(content[start : start + len(content) // 8 + 1])
                writer.flush()
                time.sleep(0.25)  # shorter than the stability window, longer than a poll
                assert source.counts["stored_frames"] == 0
                assert item_status(store, target) is None
        wait_for(lambda: source.counts["stored_frames"] == 6)
    finally:
        source.stop()
    acq = store.acquisition("slow")
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(6)]), data)
    assert rejected("truncated") == before


def test_rejected_file_fixed_later_is_stored_and_restart_stores_nothing_twice(tmp_path, watched):
    store = Store(tmp_path / "store")
    (watched / "acq").mkdir()
    data = stack(3, 8)
    broken = watched / "acq" / "f1.tif"
    broken.write_bytes(b"II*\x00garbage")
    tifffile.imwrite(watched / "acq" / "f0.tif", data[0])
    source = run_source(store, watched)
    try:
        wait_for(lambda: item_status(store, broken) == "rejected")
        tifffile.imwrite(broken, data[1])  # the user re-exports it
        wait_for(lambda: item_status(store, broken) == "stored")
    finally:
        source.stop()
    tifffile.imwrite(watched / "acq" / "f2.tif", data[2])  # arrives while nothing watches
    store.close()
    store = Store(tmp_path / "store")
    source = run_source(store, watched)
    try:
        wait_for(lambda: item_status(store, watched / "acq" / "f2.tif") == "stored")
        time.sleep(1.5)  # a full rescan more: nothing is taken twice
    finally:
        source.stop()
    acq = store.acquisition("acq")
    assert acq.stored_frames() == [0, 1, 2]
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(3)]), data)


def test_unreadable_file_does_not_block_others_and_is_stored_once_readable(
    tmp_path, watched, monkeypatch
):
    store = Store(tmp_path / "store")
    data = stack(4, 12)
    for n, name in enumerate(["cells/img_1.tif", "cells/img_2.tif", "cells/img_3.tif", "b/x.tif"]):
        (watched / name).parent.mkdir(exist_ok=True)
        tifffile.imwrite(watched / name, data[n])
    locked = watched / "cells/img_2.tif"
    before = locked.stat()
    locked.chmod(0o000)  # e.g. written by another account with umask 077
    if os.access(locked, os.R_OK):  # root reads anyway: deny as the file system would

        def denied(path, strict=False):
            if not path.stat().st_mode & 0o444:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return read_tiff(path, strict)

        monkeypatch.setattr(folder_source, "read_tiff", denied)
    source = run_source(store, watched)
    try:
        wait_for(lambda: source.counts["stored_files"] == 3 and source.failures >= 2)
        assert item_status(store, locked) is None  # not rejected: tried at every rescan
        assert "PermissionError" in source.health()["last_error"]
        locked.chmod(0o644)  # size and mtime unchanged
        assert (locked.stat().st_size, locked.stat().st_mtime_ns) == (
            before.st_size,
            before.st_mtime_ns,
        )
        wait_for(lambda: item_status(store, locked) == "stored")
        assert source.health()["state"] == "running"
    finally:
        source.stop()
    acq = store.acquisition("cells")
    assert acq.stored_frames() == [0, 1, 2]  # the late file after the others
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(3)]), data[[0, 2, 1]])
    np.testing.assert_array_equal(store.acquisition("b").read_raw(0), data[3])


def ome_set(planes: np.ndarray, names: list[str], channels: int = 1) -> dict[str, tuple]:
    """`planes` split over the files `names` as Micro-Manager writes long acquisitions: the
    first file's OME-XML describes the whole set by UUID, the others are BinaryOnly.
    Returns name -> (pages, description)."""
    ns = 'xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'
    per = len(planes) // len(names)
    tiffdata = "".join(
        f'<TiffData FirstT="{k * per // channels}" IFD="0" PlaneCount="{per}">'
        f'<UUID FileName="{name}">urn:uuid:{k}</UUID></TiffData>'
        for k, name in enumerate(names)
    )
    channel = "".join(f'<Channel ID="Channel:0:{c}" SamplesPerPixel="1"/>' for c in range(channels))
    master = (
        f'<?xml version="1.0"?><OME {ns} UUID="urn:uuid:0"><Image ID="Image:0"><Pixels '
        f'ID="Pixels:0" DimensionOrder="XYCZT" Type="{planes.dtype}" SizeX="{planes.shape[2]}" '
        f'SizeY="{planes.shape[1]}" SizeC="{channels}" SizeZ="1" '
        f'SizeT="{len(planes) // channels}">{channel}{tiffdata}</Pixels></Image></OME>'
    )
    return {
        name: (
            planes[k * per : (k + 1) * per],
            master
            if k == 0
            else f'<?xml version="1.0"?><OME {ns} UUID="urn:uuid:{k}">'
            f'<BinaryOnly MetadataFile="{names[0]}" UUID="urn:uuid:0"/></OME>',
        )
        for k, name in enumerate(names)
    }


def write_tiff(path: Path, pages_description: tuple) -> None:
    pages, description = pages_description  # minisblack: 3 or 4 pages would be one RGB(A) page
    tifffile.imwrite(path, pages, description=description, metadata=None, photometric="minisblack")


def test_multi_file_ome_set_stores_each_plane_exactly_once(tmp_path, watched):
    store = Store(tmp_path / "store")
    planes = stack(6, 13)
    files = ome_set(planes, ["s.ome.tif", "s_1.ome.tif", "s_2.ome.tif"])
    for acquisition in ("complete", "growing"):
        (watched / acquisition).mkdir()
    for name, content in files.items():
        write_tiff(watched / "complete" / name, content)
    write_tiff(watched / "growing/s.ome.tif", files["s.ome.tif"])  # its siblings come later
    source = run_source(store, watched)
    try:
        wait_for(lambda: item_status(store, watched / "growing/s.ome.tif") == "stored")
        for name in ("s_1.ome.tif", "s_2.ome.tif"):
            write_tiff(watched / "growing" / name, files[name])
        wait_for(lambda: source.counts["stored_files"] == 6)
        time.sleep(1.5)  # a full rescan more: nothing is taken twice
    finally:
        source.stop()
    for acquisition in ("complete", "growing"):
        acq = store.acquisition(acquisition)
        assert acq.stored_frames() == list(range(6)), acquisition
        np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(6)]), planes)


def test_a_damaged_first_file_of_an_ome_set_is_rejected_and_the_others_still_read(tmp_path):
    """A BinaryOnly file looks up its set's layout in the first file; tifffile's errors for a
    damaged first file belong to that file, not to the BinaryOnly one being read."""
    planes = stack(4, 15)
    for name, content in ome_set(planes, ["s.ome.tif", "s_1.ome.tif"]).items():
        write_tiff(tmp_path / name, content)
    first = tmp_path / "s.ome.tif"
    content = first.read_bytes()
    first.write_bytes(content[: content.index(b"<OME") + 50])  # cut inside its OME-XML
    with pytest.raises(TiffRefused) as damaged:
        read_tiff(first, strict=True)
    assert damaged.value.reason == "truncated"
    np.testing.assert_array_equal(read_tiff(tmp_path / "s_1.ome.tif", strict=True)[0], planes[2:])


def test_multi_channel_and_z_stack_files_are_rejected_time_stacks_stored(tmp_path, watched):
    store = Store(tmp_path / "store")
    planes = stack(4, 14)
    holds = {
        "channels/c.ome.tif": "2 channels",
        "zstack/z.ome.tif": "3 z-planes",
        "imagej/z.tif": "3 z-planes",
        "split/s.ome.tif": "2 channels",  # first file of a two-channel multi-file OME set
        "split/s_1.ome.tif": "2 channels",  # a BinaryOnly file of it: the first file says so
        "companion/s_1.ome.tif": "2 channels",  # BinaryOnly, the set described in a .ome file
    }
    for name in holds:
        (watched / name).parent.mkdir(exist_ok=True)
    tifffile.imwrite(watched / "channels/c.ome.tif", planes[:2], ome=True, metadata={"axes": "CYX"})
    tifffile.imwrite(watched / "zstack/z.ome.tif", planes[:3], ome=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(watched / "imagej/z.tif", planes[:3], imagej=True, metadata={"axes": "ZYX"})
    split = ome_set(planes, ["s.ome.tif", "s_1.ome.tif"], channels=2)
    write_tiff(watched / "split/s.ome.tif", split["s.ome.tif"])
    write_tiff(watched / "split/s_1.ome.tif", split["s_1.ome.tif"])
    (watched / "companion/s.companion.ome").write_text(split["s.ome.tif"][1])
    pages, binary_only = split["s_1.ome.tif"]
    binary_only = binary_only.replace('"s.ome.tif"', '"s.companion.ome"')
    write_tiff(watched / "companion/s_1.ome.tif", (pages, binary_only))
    (watched / "movie").mkdir()
    tifffile.imwrite(watched / "movie/a.ome.tif", planes[:3], ome=True, metadata={"axes": "TYX"})
    hyperstack = planes[3:].reshape(1, 1, 1, *SHAPE)  # ImageJ TZCYX, only T may exceed one
    tifffile.imwrite(watched / "movie/b.tif", hyperstack, imagej=True, metadata={"axes": "TZCYX"})
    counted = rejected("shape")
    run_until(store, watched, rejected_files=len(holds), stored_files=2)
    for name, what in holds.items():
        reason = store.source_items("folder").get(str(watched / name)).reason
        assert reason.startswith("shape") and f"holds {what}" in reason, reason
        assert "one grayscale plane per frame" in reason
    assert rejected("shape") == counted + len(holds)
    assert store.acquisitions() == ["movie"]
    acq = store.acquisition("movie")
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(4)]), planes)


@pytest.mark.parametrize(
    "shape, photometric", [((2, 3, 8, 8), "minisblack"), ((8, 8, 3), "rgb"), ((3, 8, 8), "rgb")]
)
def test_strict_read_tiff_refuses_multi_channel_and_colour_images(tmp_path, shape, photometric):
    path = tmp_path / "colour.tif"
    tifffile.imwrite(path, np.zeros(shape, np.uint8), photometric=photometric)
    with pytest.raises(TiffRefused) as error:
        read_tiff(path, strict=True)
    assert error.value.reason == "shape"


def test_a_stack_that_grows_after_it_was_taken_stores_the_added_pages(tmp_path, watched):
    """A time-lapse written page by page into one file is taken whenever it pauses; the pages
    added later follow its frames, also when it grew while the watcher was stopped."""
    store = Store(tmp_path / "store")
    (watched / "lapse").mkdir()
    path, pages = watched / "lapse" / "lapse.tif", stack(7, 5)
    tifffile.imwrite(path, pages[:3], photometric="minisblack")
    source = run_source(store, watched)
    try:
        wait_for(lambda: source.counts["stored_frames"] == 3)
        tifffile.imwrite(path, pages[:5], photometric="minisblack")  # two pages more
        wait_for(lambda: source.counts["stored_frames"] == 5)
    finally:
        source.stop()
    tifffile.imwrite(path, pages, photometric="minisblack")  # two more while stopped
    source = run_source(store, watched)
    try:
        wait_for(lambda: source.counts["stored_frames"] == 2)
    finally:
        source.stop()
    acquisition = store.acquisition("lapse")
    assert acquisition.stored_frames() == list(range(7))
    for t, page in enumerate(pages):
        np.testing.assert_array_equal(acquisition.read_raw(t), page)
    item = store.source_items("folder").get(str(path))
    assert (item.status, item.first_t, item.frames) == ("stored", 0, 7)


def test_frames_appended_one_by_one_with_tifffile_are_one_growing_stack(tmp_path, watched):
    """`tifffile.imwrite(path, frame, append=True)` writes a series per call: one stack."""
    store = Store(tmp_path / "store")
    (watched / "script").mkdir()
    path, pages = watched / "script" / "run.tif", stack(6, 7)
    for page in pages[:4]:
        tifffile.imwrite(path, page, append=True)
    run_until(store, watched, stored_frames=4)
    for page in pages[4:]:
        tifffile.imwrite(path, page, append=True)
    run_until(store, watched, stored_frames=2)  # a new source: the two added pages
    acquisition = store.acquisition("script")
    np.testing.assert_array_equal(np.stack([acquisition.read_raw(t) for t in range(6)]), pages)


def test_a_stored_file_changed_otherwise_is_counted_and_its_frames_kept(tmp_path, watched):
    store = Store(tmp_path / "store")
    (watched / "cells").mkdir()
    first, second = stack(3, 1), stack(2, 2)
    tifffile.imwrite(watched / "cells" / "a.tif", first, photometric="minisblack")
    tifffile.imwrite(watched / "cells" / "b.tif", second, photometric="minisblack")
    changed = rejected("changed")
    source = run_source(store, watched)
    try:
        wait_for(lambda: source.counts["stored_frames"] == 5)
        tifffile.imwrite(watched / "cells" / "a.tif", stack(4, 3), photometric="minisblack")
        wait_for(lambda: rejected("changed") >= changed + 1)  # other pixels
        grown = np.concatenate([first, stack(1, 4)])
        tifffile.imwrite(watched / "cells" / "a.tif", grown, photometric="minisblack")
        wait_for(lambda: rejected("changed") >= changed + 2)  # grew, but b.tif's frames follow
    finally:
        source.stop()
    acquisition = store.acquisition("cells")
    assert acquisition.stored_frames() == list(range(5))
    for t, page in enumerate(np.concatenate([first, second])):
        np.testing.assert_array_equal(acquisition.read_raw(t), page)
    assert item_status(store, watched / "cells" / "a.tif") == "stored"


def test_missing_watched_folder_is_a_user_error(tmp_path):
    from pn2v_live.errors import UserError

    with pytest.raises(UserError, match="does not exist"):
        FolderSource(Store(tmp_path / "s"), [tmp_path / "nope"]).start()


def test_custom_pattern_groups_flat_files_by_name_prefix(tmp_path, watched):
    store = Store(tmp_path / "store")
    data = stack(4, 11)
    for n, prefix in enumerate(["expA", "expB", "expA", "expB"]):
        tifffile.imwrite(watched / f"{prefix}_t{n:03d}.tif", data[n])
    source = run_source(store, watched, pattern=r"(?P<acquisition>[^/_]+)_t\d+\.tif")
    try:
        wait_for(lambda: source.counts["stored_frames"] == 4)
    finally:
        source.stop()
    assert store.acquisitions() == ["expA", "expB"]
    np.testing.assert_array_equal(store.acquisition("expA").read_raw(1), data[2])
    np.testing.assert_array_equal(store.acquisition("expB").read_raw(0), data[1])


POSITIONS_PATTERN = r"[^/]+/(?P<acquisition>[^/]+_Pos\d+)(_\d+)?\.ome\.tif"  # as in docs/ingest.md


def positions_xml(names: list[str], frames: int, own: int) -> str:
    """The OME-XML each file of a one-file-per-position set carries: an Image per position,
    each naming its file by UUID; the file's own UUID is `own`'s."""
    images = "".join(
        f'<Image ID="Image:{k}"><Pixels ID="Pixels:{k}" DimensionOrder="XYCZT" Type="uint16" '
        f'SizeX="{SHAPE[1]}" SizeY="{SHAPE[0]}" SizeC="1" SizeZ="1" SizeT="{frames}">'
        f'<Channel ID="Channel:{k}:0" SamplesPerPixel="1"/><TiffData PlaneCount="{frames}">'
        f'<UUID FileName="{name}">urn:uuid:{k}</UUID></TiffData></Pixels></Image>'
        for k, name in enumerate(names)
    )
    ns = 'xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"'
    return f'<?xml version="1.0"?><OME {ns} UUID="urn:uuid:{own}">{images}</OME>'


def test_positions_pattern_gives_each_growing_position_file_its_own_acquisition(tmp_path, watched):
    """Multi-position time-lapse, Micro-Manager style: one growing file per position in one
    folder (`exp_1/exp_1_MMStack_Pos0.ome.tif`, ...), each finally carrying the OME-XML of all
    positions. With the pattern in docs/ingest.md each position is an acquisition and every
    added page is stored in order."""
    store = Store(tmp_path / "store")
    (watched / "exp_1").mkdir()
    pages = {pos: stack(6, 20 + pos) for pos in (0, 1)}
    names = [f"exp_1_MMStack_Pos{pos}.ome.tif" for pos in (0, 1)]
    source = run_source(store, watched, pattern=POSITIONS_PATTERN)
    try:
        for grown in (2, 4, 6):  # both positions grow side by side
            for pos, name in enumerate(names):
                growing = {"metadata": {"axes": "TYX"}}  # tifffile's OME-XML: a time series
                closed = {"description": positions_xml(names, grown, pos), "metadata": None}
                options = closed if grown == 6 else growing
                tifffile.imwrite(watched / "exp_1" / name, pages[pos][:grown], **options)
            wait_for(lambda: source.counts["stored_frames"] == 2 * grown)  # noqa: B023
    finally:
        source.stop()
    assert store.acquisitions() == ["exp_1_MMStack_Pos0", "exp_1_MMStack_Pos1"]
    for pos in (0, 1):
        acquisition = store.acquisition(f"exp_1_MMStack_Pos{pos}")
        stored = np.stack([acquisition.read_raw(t) for t in acquisition.stored_frames()])
        np.testing.assert_array_equal(stored, pages[pos])


@pytest.mark.parametrize("pattern, message", [("(", "not a regular"), (r"[^/]+", "group named")])
def test_bad_pattern_is_a_user_error(tmp_path, watched, pattern, message):
    from pn2v_live.errors import UserError

    with pytest.raises(UserError, match=message):
        FolderSource(Store(tmp_path / "s"), [watched], pattern=pattern)


class InjectedFault(BaseException):  # not an Exception: watchdog's observer loop lets it through
    pass


def test_a_dead_file_event_observer_is_reported_unhealthy(tmp_path, watched, monkeypatch):
    notice = folder_source._Events.on_created

    def on_created(self, event):
        if str(event.src_path).endswith("inject-fault"):
            raise InjectedFault("injected into the file-event observer")
        notice(self, event)

    monkeypatch.setattr(folder_source._Events, "on_created", on_created)
    store = Store(tmp_path / "store", writer=True)
    source = run_source(store, watched)
    try:
        assert [str(report) for report in source.health_reports(30)] == [
            "folder-source ok",
            "folder-events ok",
        ]
        (watched / "inject-fault").touch()
        wait_for(lambda: not source.health_reports(30)[1].healthy)
        assert str(source.health_reports(30)[1]) == "folder-events dead (its thread ended)"
        assert source.health_reports(30)[0].healthy  # the worker still rescans the folder
    finally:
        source.stop()
        store.close()
