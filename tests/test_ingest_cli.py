"""`pn2v-live send`, `simulate` and `ingest` against a real receiver and real files."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from pn2v_live.errors import UserError
from pn2v_live.pipeline.zmq_source import ZmqSource
from pn2v_live.service.cli import app
from pn2v_live.storage.store import Store
from pn2v_live.storage.tiff_reader import read_tiff
from pn2v_live.wire.simulate import movie

runner = CliRunner()


@pytest.fixture
def receiver(tmp_path):
    source = ZmqSource(Store(tmp_path / "store"), "tcp://127.0.0.1:*")
    source.start()
    yield source
    source.stop()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=True)


def test_send_real_scmos_stack_then_resend_stores_nothing_twice(receiver, data_dir):
    path = data_dir / "acsn_scmos" / "raw.tif"
    expected = tifffile.imread(path)
    args = ["send", str(path), "--to", receiver.bind, "--status", receiver.status_bind]
    first = invoke(*args, "--timeout", "30")
    assert first.exit_code == 0, first.output
    assert f"raw: all {len(expected)} frames stored" in first.output
    acq = receiver.store.acquisition("raw")
    assert acq.dtype == np.uint16 and acq.closed
    np.testing.assert_array_equal(
        np.stack([acq.read_raw(t) for t in acq.stored_frames()]), expected
    )
    stored = receiver.health()["stored"]
    again = invoke(*args, "--timeout", "30")
    assert again.exit_code == 0, again.output
    assert receiver.health()["stored"] == stored  # nothing was sent again, nothing stored twice


def test_simulate_over_zmq_plays_synthetic_frames_and_closes(receiver):
    result = invoke(
        "simulate", "--to", receiver.bind, "--status", receiver.status_bind,
        "--fps", "200", "--frames", "12", "--size", "32", "--acquisition", "sim",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    expected = movie(12, shape=(32, 32))
    deadline = time.monotonic() + 20
    while (
        "sim" not in receiver.store.acquisitions() or not receiver.store.acquisition("sim").closed
    ):
        assert time.monotonic() < deadline, "the end marker never arrived"
        time.sleep(0.05)
    acq = receiver.store.acquisition("sim")
    wait_until = time.monotonic() + 5
    while not acq.closed:  # the end marker may be handled by another writer thread
        assert time.monotonic() < wait_until
        time.sleep(0.05)
    assert acq.expected_frames == 12
    np.testing.assert_array_equal(np.stack([acq.read_raw(t) for t in range(12)]), expected)


def test_simulate_into_folder_writes_readable_tiffs_from_a_source_stack(tmp_path, data_dir):
    source = data_dir / "acsn_scmos" / "raw.tif"
    result = invoke(
        "simulate", "--folder", str(tmp_path / "out"), "--fps", "100", "--frames", "7",
        "--source", str(source), "--frames-per-file", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "out" / "raw").iterdir())
    assert [f.name for f in files] == ["frame_000000.tif", "frame_000003.tif", "frame_000006.tif"]
    written = np.concatenate([read_tiff(f, strict=True)[0] for f in files])
    np.testing.assert_array_equal(written, tifffile.imread(source)[:7])


@pytest.mark.parametrize(
    "args, message",
    [
        (["simulate", "--frames", "3"], "exactly one of --to"),
        (["simulate", "--to", "tcp://127.0.0.1:1", "--folder", "x"], "exactly one of --to"),
        (["simulate", "--folder", "x", "--acquisition", "../etc"], "not allowed"),
        (["ingest", "--data", "x"], "nothing to ingest"),
        (["ingest", "--data", "x", "--folder", "/no/such/folder"], "does not exist"),
        (["send", "/no/such.tif"], "no such file"),
    ],
)
def test_user_mistakes_are_user_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)
