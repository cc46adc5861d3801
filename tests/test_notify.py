"""systemd integration: the notify protocol on a real unix datagram socket, and the unit file."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, require
from serve_files import listeners, save_camera_noise_model

from pn2v_live.pipeline.stage import Stage
from pn2v_live.service.config import load_config
from pn2v_live.service.daemon import Daemon
from pn2v_live.service.notify import SystemdNotifier

CLI = Path(sys.executable).with_name("pn2v-live")
UNIT = PROJECT_ROOT / "service" / "pn2v-live.service"


@pytest.fixture
def notify_socket(tmp_path):
    """A bound unix datagram socket standing in for systemd's notification socket."""
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(0.5)
    yield path, server
    server.close()


def receive_all(server: socket.socket, until: float) -> list[str]:
    messages = []
    while time.monotonic() < until:
        try:
            messages.append(server.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def test_notifier_sends_state_lines_in_order(notify_socket):
    path, server = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "3000000"})
    assert notifier.watchdog_interval == pytest.approx(1.5)
    notifier.ready("up")
    notifier.watchdog()
    notifier.status("backlog 3 frames")
    notifier.stopping()
    notifier.close()
    messages = receive_all(server, time.monotonic() + 2)
    assert messages == [
        "READY=1\nSTATUS=up",
        "WATCHDOG=1",
        "STATUS=backlog 3 frames",
        "STOPPING=1\nSTATUS=draining",
    ]


def test_notifier_outside_systemd_is_silent_and_watchdog_is_for_our_pid_only():
    notifier = SystemdNotifier({})
    notifier.ready("up")  # no socket: nothing to send, no error
    assert notifier.watchdog_interval is None
    other_pid = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert SystemdNotifier(other_pid).watchdog_interval is None


def test_abstract_namespace_socket(tmp_path):
    name = f"pn2v-live-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + name)
    server.settimeout(2)
    try:
        SystemdNotifier({"NOTIFY_SOCKET": "@" + name}).ready("up")
        assert server.recv(4096) == b"READY=1\nSTATUS=up"
    finally:
        server.close()


def test_daemon_reports_ready_watchdog_stopping_and_exits_0_on_sigterm(tmp_path, notify_socket):
    path, server = notify_socket
    save_camera_noise_model(tmp_path / "nm.pt")
    config = tmp_path / "pn2v-live.toml"
    config.write_text(
        f"""
[store]
root = "{tmp_path / "store"}"
[noise_model]
path = "nm.pt"
[ingest.zmq]
bind = ""
{listeners()}"""
    )
    watchdog = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
    env = {**os.environ, **watchdog, "PYTHONFAULTHANDLER": "1"}  # SIGABRT: print all stacks
    env.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen(
        [CLI, "serve", "--config", config], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        messages = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(m == "WATCHDOG=1" for m in messages):
            messages += receive_all(server, deadline)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.send_signal(signal.SIGABRT)
            pytest.fail(f"no exit 60 s after SIGTERM; its threads:\n{daemon.communicate()[1]}")
        assert daemon.returncode == 0
        messages += receive_all(server, time.monotonic() + 1)
    finally:
        daemon.kill()
    kinds = [m.splitlines()[0] for m in messages]
    ready = kinds.index("READY=1")
    first_ping = kinds.index("WATCHDOG=1")
    stopping = kinds.index("STOPPING=1")
    assert ready < first_ping < stopping
    assert "STATUS=" in messages[ready]
    assert "WATCHDOG=1" not in kinds[stopping:]
    assert "stopped" in daemon.stderr.read()


def test_systemd_analyze_accepts_the_unit(tmp_path):
    require(
        shutil.which("systemd-analyze") is not None,
        "systemd-analyze not installed (apt-get install systemd)",
    )
    # verify checks that ExecStart exists: point it at a stand-in for the installed console script.
    executable = tmp_path / "pn2v-live"
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    text = UNIT.read_text()
    assert "/opt/pn2v-live/bin/pn2v-live" in text
    unit = tmp_path / "pn2v-live.service"
    unit.write_text(text.replace("/opt/pn2v-live/bin/pn2v-live", str(executable)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warnings: none
    for key in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "User=pn2v-live",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
        "ReadWritePaths=",
    ):
        assert key in text


class StallingStage(Stage):
    """A real stage whose loop makes progress for `healthy_seconds`, then hangs in work()."""

    def __init__(self, healthy_seconds: float):
        super().__init__("stalling", idle_seconds=0.02)
        self.until = time.monotonic() + healthy_seconds
        self.release = threading.Event()

    def work(self) -> bool:
        if time.monotonic() > self.until:
            self.release.wait()  # stuck: no more beats
        return False


def test_watchdog_pings_stop_when_a_loop_stops_making_progress(notify_socket):
    path, server = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    daemon = Daemon(load_config(None), notifier)
    stage = StallingStage(healthy_seconds=1.0)
    daemon.sources.append(stage)
    pings: list[float] = []
    done = threading.Event()

    def record() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                if server.recv(4096) == b"WATCHDOG=1":
                    pings.append(time.monotonic())

    stage.start()
    started = time.monotonic()
    recorder = threading.Thread(target=record)
    recorder.start()
    threading.Timer(3.5, daemon.request_stop).start()
    try:
        daemon.run()  # main thread: installs the signal handlers, checks every 0.2 s
    finally:
        stage.release.set()
        done.set()
        recorder.join()
    assert len(pings) >= 3, pings  # while the loop made progress (its first second)
    # Silent for 2 × interval = 0.4 s after its last beat at 1.0 s: no ping after ~1.6 s.
    assert max(pings) - started < 2.2, [round(p - started, 2) for p in pings]
