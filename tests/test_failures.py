"""How stages fail: reasons, back-off, few log lines, the failure metric and honest liveness."""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time

import numpy as np
from prometheus_client import REGISTRY

from pn2v_live.pipeline.stage import (
    MAX_BACKOFF_SECONDS,
    Failures,
    Stage,
    backoff_seconds,
    failure_reason,
)


def failures_metric(stage: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "pn2v_live_stage_failures_total", {"stage": stage, "reason": reason}
    )
    return value or 0.0


def test_failure_reasons_are_short_fixed_words():
    disk_full = OSError(errno.ENOSPC, "No space left on device")
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert failure_reason(disk_full) == failure_reason(quota) == "disk_full"
    assert failure_reason(sqlite3.OperationalError("database or disk is full")) == "disk_full"
    try:  # a library that wraps the OS error still says disk_full
        try:
            raise disk_full
        except OSError as cause:
            raise RuntimeError("could not write chunk") from cause
    except RuntimeError as wrapped:
        assert failure_reason(wrapped) == "disk_full"
    assert failure_reason(PermissionError(errno.EACCES, "Permission denied")) == "permission"
    assert failure_reason(OSError(errno.EIO, "Input/output error")) == "io"
    assert failure_reason(MemoryError()) == "memory"
    assert failure_reason(FloatingPointError("diverged")) == "diverged"
    assert failure_reason(ValueError("a bug")) == "error"


def test_back_off_doubles_from_one_second_to_five_minutes():
    assert [backoff_seconds(n) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert backoff_seconds(10_000) == MAX_BACKOFF_SECONDS


def test_a_repeated_failure_is_logged_at_its_1st_2nd_4th_8th_time_with_its_count(caplog):
    log = logging.getLogger("pn2v_live.test-failures")
    failures = Failures("test-failures", log)
    before = failures_metric("test-failures", "disk_full")
    caplog.set_level(logging.INFO, logger=log.name)
    for _ in range(100):
        failures.failed(OSError(errno.ENOSPC, "No space left on device"))
    lines = [r for r in caplog.records if r.name == log.name]
    assert len(lines) == 7  # 1, 2, 4, 8, 16, 32, 64
    assert "failed (disk_full)" in lines[0].getMessage() and lines[0].exc_info is None
    assert "64 times so far, 64 in a row" in lines[-1].getMessage()
    assert failures_metric("test-failures", "disk_full") == before + 100
    assert failures.pausing and failures.in_a_row == 100
    failures.failed(ValueError("another failure"))  # a distinct failure: its own first line
    assert caplog.records[-1].exc_info is not None  # a bug's first line has the traceback
    failures.succeeded()
    assert "works again after 101 failure(s) in a row" in caplog.records[-1].getMessage()
    assert not failures.pausing and failures.in_a_row == 0


class AlwaysFailing(Stage):
    """A real stage whose work() raises every time."""

    def __init__(self, error: Exception):
        super().__init__("always-failing", idle_seconds=0.01)
        self.error = error
        self.calls: list[float] = []

    def work(self) -> bool:
        self.calls.append(time.monotonic())
        raise self.error


def wait_until(condition, timeout: float) -> float:
    """Seconds until `condition()` held (fails after `timeout`)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "condition not reached"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_stage_whose_work_always_raises_is_unhealthy_within_its_timeout(caplog):
    caplog.set_level(logging.INFO, logger="pn2v_live.always-failing")
    stage = AlwaysFailing(RuntimeError("injected"))
    stage.start()
    try:
        assert stage.liveness(max_silence=1.0).state == "retrying"  # healthy: not yet timed out
        took = wait_until(lambda: not stage.alive(max_silence=1.0), timeout=3)
        assert took < 1.5
        liveness = stage.liveness(max_silence=1.0)
        assert (liveness.state, liveness.reason) == ("failing", "error")
        time.sleep(2.5)
    finally:
        assert stage.stop(timeout=5)
    # Backed off: tries at 0, 1 and 3 s (not a hundred), and few lines: the 1st with a traceback.
    gaps = [round(b - a) for a, b in zip(stage.calls, stage.calls[1:], strict=False)]
    assert gaps[:2] == [1, 2], gaps
    lines = [r for r in caplog.records if r.name == "pn2v_live.always-failing"]
    assert len(lines) <= 3 and sum(r.exc_info is not None for r in lines) == 1


def test_a_disk_full_pause_is_healthy_and_ends_when_work_succeeds_again(caplog):
    caplog.set_level(logging.INFO, logger="pn2v_live.always-failing")
    stage = AlwaysFailing(OSError(errno.ENOSPC, "No space left on device"))
    released = threading.Event()
    work = stage.work

    def work_until_space() -> bool:
        return True if released.is_set() else work()

    stage.work = work_until_space
    stage.start()
    try:
        time.sleep(1.5)  # failed twice, pausing: its loop comes round, so it counts as healthy
        liveness = stage.liveness(max_silence=1.0)
        assert (liveness.state, liveness.reason) == ("paused", "disk_full")
        assert liveness.healthy
        assert all(r.exc_info is None for r in caplog.records)  # disk full needs no traceback
        released.set()
        wait_until(lambda: stage.liveness(max_silence=1.0).state == "ok", timeout=5)
    finally:
        assert stage.stop(timeout=5)
    assert "always-failing works again after" in caplog.records[-1].getMessage()


def test_a_hung_stage_is_stuck_and_a_stopped_one_is_not_healthy():
    release = threading.Event()

    class Hanging(Stage):
        def work(self) -> bool:
            release.wait()
            return False

    stage = Hanging("hanging", idle_seconds=0.01)
    stage.start()
    try:
        wait_until(lambda: stage.liveness(max_silence=0.5).state == "stuck", timeout=3)
    finally:
        release.set()
        assert stage.stop(timeout=5)
    assert stage.liveness(max_silence=0.5).state == "stopped"
    assert not stage.alive(max_silence=0.5)


def test_the_folder_watcher_pauses_on_a_full_disk_and_takes_the_waiting_files_after(
    tmp_path, monkeypatch, caplog
):
    """Every write fails as on a full disk for a few seconds: the watcher pauses (no line per
    file), then stores all files in order once writes work again."""
    import tifffile

    from pn2v_live.pipeline.folder_source import FolderSource
    from pn2v_live.storage.acquisition import Acquisition
    from pn2v_live.storage.store import Store

    watched = tmp_path / "scope" / "cells"
    watched.mkdir(parents=True)
    data = np.random.default_rng(0).integers(0, 250, (6, 16, 16)).astype("uint16")
    for t, frame in enumerate(data):
        tifffile.imwrite(watched / f"img_{t}.tif", frame)
    full = threading.Event()
    full.set()
    write_raw = Acquisition.write_raw

    def write_unless_full(self, t, frame, publish=True):
        if full.is_set():
            raise OSError(errno.ENOSPC, "No space left on device")
        write_raw(self, t, frame, publish)

    monkeypatch.setattr(Acquisition, "write_raw", write_unless_full)
    caplog.set_level(logging.INFO, logger="pn2v_live")
    before = failures_metric("folder-source", "disk_full")
    store = Store(tmp_path / "store")
    source = FolderSource(store, [tmp_path / "scope"], stable_seconds=0.2, rescan_seconds=60)
    source.start()
    try:
        wait_until(lambda: source.failure_log.in_a_row >= 1, timeout=30)
        time.sleep(2.5)  # failures at 0, 1 and 3 s
        assert source.liveness(max_silence=5).state == "paused"
        assert source.counts["stored_frames"] == 0
        full.clear()
        wait_until(lambda: source.counts["stored_frames"] == 6, timeout=20)
    finally:
        source.stop()
    failed = failures_metric("folder-source", "disk_full") - before
    assert 1 <= failed <= 3  # at 0, 1 and 3 s: backed off, not once per file and pass
    lines = [r.getMessage() for r in caplog.records if "folder" in r.name]
    assert sum("failed" in line for line in lines) <= 2, lines
    assert any("folder-source works again" in line for line in lines)
    acquisition = store.acquisition("cells")
    np.testing.assert_array_equal(np.stack([acquisition.read_raw(t) for t in range(6)]), data)
    store.close()
