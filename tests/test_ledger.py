"""The SQLite ingest ledger: frame rows, source items, frame-range reservation, WAL mode."""

from __future__ import annotations

import sqlite3

from pn2v_live.storage.ledger import Ledger
from pn2v_live.storage.source_items import SourceItems


def test_wal_mode_and_rows_survive_reopen(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.add_frame("a", 3)
    ledger.add_frame("a", 1)
    ledger.add_frame("a", 3)
    SourceItems(ledger, "zmq").mark_stored("a/3", "a", 3, 1)
    SourceItems(ledger, "folder").mark_rejected("/x/bad.tif", "truncated TIFF", size=10, mtime_ns=5)
    ledger.set_denoised("a", 1, 4, "2:0")
    ledger.close()
    with sqlite3.connect(tmp_path / "ingest-ledger.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Ledger(tmp_path)
    assert again.frames("a") == [1, 3]
    assert again.denoised_twins("a") == {1: (4, "2:0")}
    bad = SourceItems(again, "folder").get("/x/bad.tif")
    assert (bad.status, bad.reason, bad.size, bad.mtime_ns) == ("rejected", "truncated TIFF", 10, 5)
    assert SourceItems(again, "zmq").get("a/3").status == "stored"
    assert SourceItems(again, "zmq").get("a/4") is None


def test_reserve_gives_consecutive_ranges_and_is_stable_for_pending_items(tmp_path):
    ledger = Ledger(tmp_path)
    folder = SourceItems(ledger, "folder")
    assert folder.reserve("/d/f1.tif", "a", 100, 1, frames=3) == 0
    assert folder.reserve("/d/f2.tif", "a", 100, 1, frames=2) == 3
    assert folder.reserve("/d/other.tif", "b", 100, 1, frames=1) == 0
    # a crash before f1 finished: asking again gives the same range
    assert folder.reserve("/d/f1.tif", "a", 100, 1, frames=3) == 0
    folder.mark_stored("/d/f1.tif", "a", 0, 3, 100, 1)
    assert [i.key for i in folder.all("pending")] == ["/d/f2.tif", "/d/other.tif"]
    # rejected items hold no range; frames stored directly (stream) count as used
    folder.mark_rejected("/d/f2.tif", "empty file", "a")
    ledger.add_frame("a", 7)
    assert folder.reserve("/d/f3.tif", "a", 100, 1, frames=1) == 8


def test_a_ledger_from_before_temporal_context_gains_the_window_column(tmp_path):
    with sqlite3.connect(tmp_path / "ingest-ledger.sqlite") as db:  # the earlier schema
        db.execute(
            "CREATE TABLE denoised (acquisition TEXT NOT NULL, t INTEGER NOT NULL, "
            "version INTEGER NOT NULL, PRIMARY KEY (acquisition, t)) WITHOUT ROWID"
        )
        db.execute("INSERT INTO denoised VALUES ('a', 0, 3)")
    ledger = Ledger(tmp_path)
    assert ledger.denoised_twins("a") == {0: (3, "0:0")}  # old twins were single-frame
    ledger.set_denoised("a", 1, 4, "1:1")
    ledger.close()
    assert Ledger(tmp_path).denoised_twins("a") == {0: (3, "0:0"), 1: (4, "1:1")}
