"""Registration of temporal windows: shifts measured on real frames, frames moved exactly, and
windows of a drifting scene aligned onto frame t."""

import shutil

import numpy as np
import pytest

from pn2v_live.core.context import Context, window
from pn2v_live.core.registration import Registration, Shifts, moved, whole_shift
from pn2v_live.service.bench.quality import drifting, load_field
from pn2v_live.storage.store import Store


def test_moved_puts_each_pixel_where_it_belongs_and_leaves_the_rest_missing():
    frame = np.arange(20, dtype=np.float32).reshape(4, 5)
    result = moved(frame, 1, -2)
    for y in range(4):
        for x in range(5):
            source = (y - 1, x + 2)
            if 0 <= source[0] < 4 and 0 <= source[1] < 5:
                assert result[y, x] == frame[source]
            else:
                assert np.isnan(result[y, x])
    assert np.isnan(moved(frame, 4, 0)).all()


@pytest.mark.parametrize("field", ["fov03", "fov04"])
def test_whole_shifts_between_noisy_confocal_frames_are_exact(data_dir, field):
    raw, truth = load_field(data_dir, field)
    for px in (0, 1, 4):
        frames, _ = drifting(raw[:12], truth, px)
        for n in (5, 7, 9):
            assert whole_shift(frames[n], frames[8]) == (0, (8 - n) * px)
    rows = raw[:, 40:]  # a vertical drift of 3 rows per frame
    moving = np.stack([rows[t, 3 * (4 - t) : 3 * (4 - t) + 400] for t in range(5)])
    assert whole_shift(moving[0], moving[4]) == (-12, 0)


def test_frames_without_shared_structure_are_not_moved():
    rng = np.random.default_rng(0)
    noise = rng.normal(100, 10, (2, 128, 128)).astype(np.float32)
    assert whole_shift(noise[0], noise[1]) == (0, 0)
    flat = np.full((64, 64), 7.0, np.float32)
    assert whole_shift(flat, flat) == (0, 0)


def test_a_drifting_window_is_aligned_onto_frame_t(data_dir):
    raw, truth = load_field(data_dir, "fov03")
    frames, _ = drifting(raw[:10], truth, 4)  # frame t shows raw columns 4t … 4t + width
    width = frames.shape[2]
    stacked = window(frames, 5, Context(3, 2))
    for channel, n in enumerate(range(2, 8)):
        lag = 4 * (n - 5)
        covered = slice(max(lag, 0), width + min(lag, 0))  # columns x of frame 5 in frame n
        scene = slice(20 + covered.start, 20 + covered.stop)  # the same places in raw
        np.testing.assert_array_equal(stacked[channel][:, covered], raw[n][:, scene])
        assert np.isnan(stacked[channel]).sum() == abs(lag) * frames.shape[1]


def test_a_part_of_a_series_shares_the_shifts_measured_in_the_whole(data_dir):
    raw, truth = load_field(data_dir, "fov03")
    frames, _ = drifting(raw[:10], truth, 2)
    whole = Registration()
    aligned = whole.align(frames[7], 7, frames[8], 8)  # measured: 2 px
    part = whole.from_frame(5)  # its frames 2 and 3 are frames 7 and 8 of the whole
    np.testing.assert_array_equal(part.align(frames[7], 2, frames[8], 3), aligned)
    same = part.align(frames[2], 2, frames[2], 3)  # not measured again (it would be 0 px)
    np.testing.assert_array_equal(same, moved(frames[2], 0, -2))
    np.testing.assert_array_equal(Registration().align(frames[2], 2, frames[2], 3), frames[2])


def test_stages_sharing_shifts_measure_each_pair_of_an_acquisition_once():
    """The daemon's inference, trainer and refiner share one `Shifts`: a pair measured by one is
    not measured again by another, pairs of other acquisitions are their own, and only the
    `limit` pairs used last are kept."""
    scene = np.random.default_rng(1).normal(100, 20, (96, 140)).astype(np.float32)
    frames = [scene[:, 2 * t : 2 * t + 120] for t in range(10)]  # drifting 2 px per frame
    flat = np.ones((96, 120), np.float32)  # registers on nothing: a pair measured on it is 0 px
    shifts = Shifts(limit=2)
    inference = shifts.series("cells")
    aligned = inference.align(frames[7], 7, frames[8], 8)  # measured: 2 px
    np.testing.assert_array_equal(aligned, moved(frames[7], 0, -2))
    trainer = shifts.series("cells").from_frame(5)  # its frames 2 and 3 are frames 7 and 8
    np.testing.assert_array_equal(trainer.align(flat, 2, flat, 3), moved(flat, 0, -2))
    other = shifts.series("other")
    np.testing.assert_array_equal(other.align(flat, 7, flat, 8), flat)  # its own pair, 0 px
    other.align(flat, 1, flat, 2)  # a third pair: the one used longest ago goes
    np.testing.assert_array_equal(inference.align(flat, 7, flat, 8), flat)  # measured anew


def test_a_name_reused_after_its_folder_was_deleted_is_registered_anew(tmp_path):
    """The stages key shifts by `Acquisition.identity`: the same while an acquisition is closed
    and reopened, new when its folder was deleted and the name came back with other frames, so
    a pair measured on the old frames is not applied to the new ones."""
    scene = np.random.default_rng(2).integers(100, 4000, (64, 80)).astype(np.uint16)
    store = Store(tmp_path, writer=True)
    first = store.create("run", (64, 64), "uint16")
    for t in range(2):
        first.write_raw(t, scene[:, 8 * t : 8 * t + 64])  # drifting 8 px per frame
    shifts, identity = Shifts(), first.identity
    old = shifts.series(identity)
    frame, reference = (first.read_raw(t).astype(np.float32) for t in (0, 1))
    np.testing.assert_array_equal(old.align(frame, 0, reference, 1), moved(frame, 0, -8))
    del first, old
    assert store.acquisition("run").identity == identity  # closed and reopened: the same frames
    shutil.rmtree(store.path("run"))
    again = store.create("run", (64, 64), "uint16")
    still = scene[:, :64]
    for t in range(2):
        again.write_raw(t, still)
    assert again.identity != identity
    new = shifts.series(again.identity)
    frame, reference = (again.read_raw(t).astype(np.float32) for t in (0, 1))
    np.testing.assert_array_equal(new.align(frame, 0, reference, 1), frame)  # measured: 0 px
    store.close()
