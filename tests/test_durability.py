"""Power-cut durability, checked by recording the order of the real fsync and commit calls: no
ledger row commits before its chunk file and every folder leading to it are fsynced, rows of
concurrent writers share commits, and model files and the `current` pointer are fsynced,
renamed and their folder fsynced, each before the next is written."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pn2v_live.core.context import Context
from pn2v_live.core.model import new_denoiser
from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.storage.ledger import Ledger
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.registry import POINTER, ModelRegistry
from pn2v_live.storage.store import Store


class Events:
    """What happened, in order, across threads: ("fsync", path) once an fsync returned,
    ("commit", rows, synchronous) just before a transaction commits, ("replace", src, dst)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple] = []

    def add(self, *event) -> None:
        with self.lock:
            self.items.append(event)

    def fsynced_before(self, index: int) -> set[Path]:
        return {Path(e[1]) for e in self.items[:index] if e[0] == "fsync"}

    def commits(self) -> list[tuple[int, list[tuple], int]]:
        return [(i, e[1], e[2]) for i, e in enumerate(self.items) if e[0] == "commit" and e[1]]


class RecordingConnection:
    """A real sqlite3 connection that records, before each commit, the frames and denoised
    rows it commits (explicit COMMIT, `commit()`, `with connection`, or an autocommitted
    statement) and the connection's `synchronous` setting at that moment."""

    def __init__(self, real: sqlite3.Connection, events: Events) -> None:
        self._real, self._events, self._pending = real, events, []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _rows(self, sql: str, rows: list) -> list[tuple]:
        words = " ".join(sql.split()).upper()
        for table in ("FRAMES", "DENOISED"):
            if words.startswith("INSERT") and f"INTO {table} " in words:
                return [(table.lower(), *row) for row in rows]
        return []

    def _commit_now(self, rows: list[tuple] = ()) -> None:
        synchronous = self._real.execute("PRAGMA synchronous").fetchone()[0]
        self._events.add("commit", [*self._pending, *rows], synchronous)
        self._pending = []

    def _before(self, sql: str, rows: list) -> None:
        words = sql.strip().upper()
        if words.startswith(("COMMIT", "END")):
            self._commit_now()
        elif words.startswith("ROLLBACK"):
            self._pending = []
        elif self._real.in_transaction:
            self._pending += self._rows(sql, rows)
        elif self._rows(sql, rows):  # autocommit: commits as it runs
            self._commit_now(self._rows(sql, rows))

    def execute(self, sql: str, params=()):
        self._before(sql, [tuple(params)])
        return self._real.execute(sql, params)

    def executemany(self, sql: str, seq):
        rows = [tuple(row) for row in seq]
        self._before(sql, rows)
        return self._real.executemany(sql, rows)

    def commit(self) -> None:
        if self._real.in_transaction:
            self._commit_now()
        self._real.commit()

    def __enter__(self):
        self._real.__enter__()
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None and self._real.in_transaction:
            self._commit_now()
        return self._real.__exit__(kind, value, traceback)


@pytest.fixture
def events(monkeypatch) -> Events:
    """Record every os.fsync (by the path of its descriptor), os.replace and sqlite commit."""
    events = Events()
    fsync, replace, connect = os.fsync, os.replace, sqlite3.connect

    def recording_fsync(descriptor: int) -> None:
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        fsync(descriptor)
        events.add("fsync", path)

    def recording_replace(source, target, **kwargs) -> None:
        replace(source, target, **kwargs)
        events.add("replace", os.path.realpath(source), os.path.realpath(target))

    def recording_connect(*args, **kwargs):
        return RecordingConnection(connect(*args, **kwargs), events)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(sqlite3, "connect", recording_connect)
    return events


def needed_on_disk(array: Path, t: int) -> set[Path]:
    """The chunk file of frame t and every folder from the array's down to it."""
    chunk = array / f"{t}/0/0/0/0"
    return {chunk, *(p for p in chunk.parents if p == array or array in p.parents)}


def test_no_frame_commits_before_its_chunk_and_folders_are_fsynced(tmp_path, events):
    store = Store(tmp_path / "store", writer=True)
    assert isinstance(store._ledger._db, RecordingConnection), "the ledger's commits are seen"
    acquisition = store.create("a", (32, 32), "uint16")
    frames = np.random.default_rng(0).integers(0, 4000, (40, 32, 32), dtype=np.uint16)

    def writer(ts: range) -> None:
        for t in ts:
            acquisition.write_raw(t, frames[t], publish=False)
            acquisition.write_denoised(t, frames[t].astype(np.float32), 1, Context(1, 0))

    threads = [threading.Thread(target=writer, args=(range(k, 40, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()

    root = (tmp_path / "store" / "a.ome.zarr").resolve()
    committed = {"frames": set(), "denoised": set()}
    for index, rows, synchronous in events.commits():
        assert synchronous == 2, "frames must commit with synchronous=FULL (WAL fsynced)"
        on_disk = events.fsynced_before(index)
        for table, _, t, *_ in rows:
            array = root / ("raw" if table == "frames" else "denoised") / "0"
            missing = needed_on_disk(array, t) - on_disk
            assert not missing, f"{table} row {t} committed before fsync of {sorted(missing)}"
            committed[table].add(t)
    assert committed == {"frames": set(range(40)), "denoised": set(range(40))}
    # and what the ledger says is what a reopened store serves
    again = Store(tmp_path / "store")
    assert again.acquisition("a").stored_frames() == list(range(40))
    again.close()


def test_concurrent_writers_share_commits(tmp_path, events, monkeypatch):
    """While one commit is slow (a busy disk), the rows of the other writers pile up and go
    into the next commit together: one WAL fsync for many frames."""
    store = Store(tmp_path / "store", writer=True)
    acquisition = store.create("a", (16, 16), "uint8")
    record = Ledger.record
    first = threading.Event()

    def slow_first_record(self, frames=(), denoised=()):
        if not first.is_set():
            first.set()
            time.sleep(0.5)
        record(self, frames, denoised)

    monkeypatch.setattr(Ledger, "record", slow_first_record)
    frame = np.zeros((16, 16), np.uint8)
    threads = [
        threading.Thread(target=acquisition.write_raw, args=(t, frame, False)) for t in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sizes = [len(rows) for _, rows, _ in events.commits()]
    assert sum(sizes) == 8 and len(sizes) < 8 and max(sizes) > 1, sizes
    assert store.committer.rounds == len(sizes)
    assert acquisition.stored_frames() == list(range(8))
    store.close()


def test_a_failed_fsync_records_nothing_and_the_frame_can_be_written_again(tmp_path, monkeypatch):
    store = Store(tmp_path / "store", writer=True)
    acquisition = store.create("a", (16, 16), "uint8")
    fsync = os.fsync

    def failing_fsync(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    frame = np.full((16, 16), 7, np.uint8)
    assert acquisition._claim(0)
    with pytest.raises(OSError, match="Input/output"):
        acquisition.write_raw(0, frame)
    acquisition._release(0)
    assert store.recorded_frames("a") == [] and not acquisition.is_stored(0)
    monkeypatch.setattr(os, "fsync", fsync)
    assert acquisition._claim(0)
    acquisition.write_raw(0, frame)
    assert store.recorded_frames("a") == [0]
    np.testing.assert_array_equal(acquisition.read_raw(0), frame)
    store.close()


def assert_written_durably(events: Events, path: Path) -> int:
    """`path` was fsynced under a temporary name, renamed into place, then its folder fsynced;
    returns the index of that folder fsync (when `path` is on disk)."""
    path, items = path.resolve(), events.items
    renames = [i for i, e in enumerate(items) if e[0] == "replace" and Path(e[2]) == path]
    assert renames, f"{path} was not renamed into place"
    rename = renames[-1]
    temporary = Path(items[rename][1])
    assert temporary in events.fsynced_before(rename), f"{path} renamed before its data fsync"
    after = [
        i
        for i, e in enumerate(items)
        if i > rename and e[0] == "fsync" and Path(e[1]) == path.parent
    ]
    assert after, f"{path.parent} not fsynced after the rename of {path.name}"
    return after[0]


def test_model_files_and_current_pointer_are_fsynced_renamed_and_their_folder_fsynced(
    tmp_path, events
):
    folder = tmp_path / "new" / "models"  # created by the registry: its entry is fsynced too
    registry = ModelRegistry(folder)
    assert (tmp_path / "new").resolve() in events.fsynced_before(len(events.items))
    denoiser = new_denoiser("pn2v", 10.0, 2.0, k=4, depth=2, features=4)
    info = registry.promote(
        denoiser, validation_loss=None, training_frames=1, training_steps=0, noise_model_id=None
    )
    checkpoint = assert_written_durably(events, folder / f"v{info.version:04d}.pt")
    metadata = assert_written_durably(events, folder / f"v{info.version:04d}.json")
    pointer = assert_written_durably(events, folder / POINTER)
    renamed = {Path(e[2]).name: i for i, e in enumerate(events.items) if e[0] == "replace"}
    assert checkpoint < renamed["v0001.json"] and metadata < renamed[POINTER] < pointer


def test_refined_noise_model_and_its_sidecar_are_written_durably(tmp_path, events):
    versions = NoiseModelVersions(tmp_path / "store" / "noise-models")
    model = PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 255))
    version = versions.save(model)
    model_file = assert_written_durably(events, version.path)
    sidecar = assert_written_durably(events, version.path.with_suffix(".json"))
    assert model_file < sidecar
