"""StopRequest: SIGTERM/SIGINT wake the waiting main thread through a real socket, with no lock."""

from __future__ import annotations

import signal
import threading

import pytest

from pn2v_live.service.stop_request import STOP_SIGNALS, StopRequest


@pytest.fixture
def request_installed():
    stop = StopRequest()
    stop.install()
    yield stop
    stop.close()


def signal_from_worker(signum: int, to_worker: bool) -> None:
    """Send `signum` to this process from a worker thread; with `to_worker` the kernel delivers
    it to that thread, not to the main thread (pthread_kill)."""
    worker = threading.Thread(
        target=lambda: (
            signal.pthread_kill(threading.get_ident(), signum)
            if to_worker
            else signal.raise_signal(signum)
        )
    )
    worker.start()
    worker.join()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_delivered_to_another_thread_wakes_the_waiting_main_thread(
    request_installed, signum
):
    # The main thread sleeps in poll(); only the wake-up byte can end the wait before 30 s.
    threading.Timer(0.2, signal_from_worker, (signum, True)).start()
    assert request_installed.wait(30) is True
    assert request_installed.wait(0) is True  # it stays requested


def test_set_from_another_thread_wakes_the_wait_and_nothing_else_does(request_installed):
    assert request_installed.wait(0.05) is False
    signal.signal(signal.SIGUSR1, lambda *_: None)  # a caught signal also writes its byte
    try:
        signal_from_worker(signal.SIGUSR1, to_worker=False)
        assert request_installed.wait(0.2) is False
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    threading.Timer(0.2, request_installed.set).start()
    assert request_installed.wait(30) is True


def test_uninstall_gives_back_the_previous_handlers_and_wakeup_descriptor():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    descriptor_before = signal.set_wakeup_fd(-1)  # read it: setting returns the old one
    signal.set_wakeup_fd(descriptor_before)
    stop = StopRequest()
    stop.install()
    assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    stop.close()
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(descriptor_before) == descriptor_before
