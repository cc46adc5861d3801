"""The daemon drains on SIGTERM also when it arrives during start-up, and when `run` fails;
closing it stops its threads."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from conftest import GLIBC_ONLY

from pn2v_live.core.noise import PoissonGaussianNoiseModel
from pn2v_live.service.config import load_config
from pn2v_live.service.daemon import Daemon
from pn2v_live.service.notify import SystemdNotifier
from pn2v_live.storage.noise_model_file import save_noise_model
from pn2v_live.storage.store import Store


@pytest.fixture
def config(tmp_path):
    """Everything off but the store, inference and trainer (no sockets, no sources)."""
    model = PoissonGaussianNoiseModel(gain=1.0, offset=0.0, read_noise=2.0, signal_range=(0, 255))
    save_noise_model(model, tmp_path / "nm.pt")
    sockets = ("ingest.zmq.bind", "metrics.bind", "viewer.bind", "publish.bind")
    off = [f'{key}=""' for key in sockets]
    return load_config(
        None,
        [f'store.root="{tmp_path / "store"}"', f'noise_model.path="{tmp_path / "nm.pt"}"', *off],
    )


@pytest.fixture(autouse=True)
def unhandled_sigterm():
    """Stand-in for SIGTERM's default action (which would kill pytest) that records the signal;
    the daemon's handlers are undone afterwards."""
    caught = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: caught.append("SIGTERM"))
    yield caught
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def store_is_closed(config) -> bool:
    """Whether the daemon gave up the store's writer lock (it closes the store last)."""
    Store(config.store.root, writer=True).close()  # UserError while the daemon holds it
    return True


def test_sigterm_during_start_up_drains_once_started(config, monkeypatch, unhandled_sigterm):
    start_sources = Daemon._start_sources

    def sigterm_then_start_sources(self):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
        start_sources(self)

    monkeypatch.setattr(Daemon, "_start_sources", sigterm_then_start_sources)
    daemon = Daemon(config, SystemdNotifier(environ={}))
    try:
        daemon.start()
        assert unhandled_sigterm == [], "SIGTERM during start-up was not the daemon's"
        daemon.run()  # returns at once: the signal asked for a drain
        assert store_is_closed(config)
    finally:
        daemon.close()


class FailingNotifier(SystemdNotifier):
    """A systemd notifier whose first watchdog ping raises; records what it was told."""

    def __init__(self):
        super().__init__(environ={})
        self.watchdog_interval = 0.05
        self.told = []

    def watchdog(self):
        raise RuntimeError("watchdog ping failed")

    def stopping(self, status="draining"):
        self.told.append("stopping")


def test_an_error_in_the_run_loop_still_drains(config):
    notifier = FailingNotifier()
    daemon = Daemon(config, notifier)
    daemon.start()
    try:
        with pytest.raises(RuntimeError, match="watchdog ping failed"):
            daemon.run()
        assert notifier.told == ["stopping"]
        assert store_is_closed(config)
    finally:
        daemon.close()


def trimmers() -> list[threading.Thread]:
    """The live threads handing freed memory back to the system (`native_memory.Trimmer`)."""
    return [thread for thread in threading.enumerate() if thread.name == "malloc-trim"]


@GLIBC_ONLY
def test_the_daemon_trims_memory_from_start_until_closed(config):
    before = trimmers()
    daemon = Daemon(config, SystemdNotifier(environ={}))
    daemon.start()
    try:
        assert len(trimmers()) == len(before) + 1
    finally:
        daemon.close()
    assert trimmers() == before
