"""Honest liveness of the real daemon (`pn2v-live serve` in a subprocess, real sockets, systemd's
notify socket stood in for by a unix datagram socket): a stage that keeps failing and a ZeroMQ
receiver killed by an injected fault stop the watchdog pings; a disk that fills during a stream
(a real small tmpfs as the store, when running as root) makes ingest refuse frames with reason
disk_full while trainer and inference pause, with few log lines and the watchdog still fed,
and everything is stored and denoised exactly once after space is freed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, require
from prometheus_client.parser import text_string_to_metric_families
from serve_files import listeners, save_camera_noise_model

from pn2v_live.storage.registry import ModelRegistry
from pn2v_live.storage.store import Store
from pn2v_live.wire.sender import FrameSender

pytestmark = pytest.mark.timeout(600)

# A serve process with `inject` (Python source) run first, to put a fault into the real code.
DRIVER = """
import sys
{inject}
from pn2v_live.service.cli import main
sys.argv = ["pn2v-live", "serve", "--config", {config!r}]
main()
"""
ALWAYS_FAILING_INFERENCE = """
from pn2v_live.pipeline.inference import InferenceScheduler
def work(self):
    raise RuntimeError("injected: every inference pass fails")
InferenceScheduler.work = work
"""
RECEIVER_FAULT = """
from pn2v_live.pipeline.zmq_source import ZmqSource
class InjectedFault(BaseException):  # not an Exception: nothing on its way catches it
    pass
answer = ZmqSource._status
def status(self, request):
    if b"inject-fault" in request[0]:
        raise InjectedFault("injected into the ZeroMQ receiver")
    return answer(self, request)
ZmqSource._status = status
"""
METRICS_FAULT = """
import socket
from pn2v_live.service import metrics_server
class InjectedFault(BaseException):  # not an Exception: socketserver's loop does not catch it
    pass
accept = metrics_server._Server.process_request
def process_request(self, request, client_address):
    if b"inject-fault" in request.recv(64, socket.MSG_PEEK):
        raise InjectedFault("injected into the metrics server")
    return accept(self, request, client_address)
metrics_server._Server.process_request = process_request
"""
SLOW_ROUND_END = """
import time
from pathlib import Path
from pn2v_live.core.training import Training
fit = Training.fit_prior_spread
def slow_fit(self, *args, **kwargs):  # as on a busy machine: what follows the steps takes long
    Path({marker!r}).touch()
    time.sleep(3)
    return fit(self, *args, **kwargs)
Training.fit_prior_spread = slow_fit
"""
TRAINER = """
[trainer]
device = "cpu"
every_frames = 8
every_seconds = 1
steps_per_round = 2
first_model_frames = 8
first_model_steps = 2
min_gain_db = -inf  # any model is promoted: rounds write model files
patch_size = 16
batch_size = 2
k = 8
context = "0:0"
[inference]
device = "cpu"
compile = false
max_in_flight = 4
"""


class Serve:
    """One `pn2v-live serve` process under a stand-in for systemd's notify socket."""

    def __init__(self, folder: Path, store: Path, watchdog_seconds: float, zmq: bool = False):
        self.folder = folder
        self.store = store
        noise_model = folder / "nm.pt"
        save_camera_noise_model(noise_model)
        self.zmq = f"tcp://127.0.0.1:{free_port(pairs=True)}" if zmq else ""
        self.metrics_port = free_port()
        self.config = folder / "serve.toml"
        self.config.write_text(
            f"""
[store]
root = "{store}"
[noise_model]
path = "{noise_model}"
refine = false
[model]
keep_versions = 1
[ingest.zmq]
bind = "{self.zmq}"
{listeners(metrics=f"127.0.0.1:{self.metrics_port}")}
{TRAINER}
"""
        )
        self.log = folder / "serve.log"
        self.socket_path = folder / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.socket_path))
        self.notify.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []  # (monotonic time, datagram)
        self._done = threading.Event()
        self._recorder = threading.Thread(target=self._record, daemon=True)
        self.watchdog_usec = int(watchdog_seconds * 1e6)
        self.process: subprocess.Popen | None = None

    def _record(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(TimeoutError):
                self.messages.append((time.monotonic(), self.notify.recv(4096).decode()))

    def start(self, inject: str = "") -> None:
        driver = self.folder / "driver.py"
        driver.write_text(DRIVER.format(inject=inject, config=str(self.config)))
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.socket_path),
            "WATCHDOG_USEC": str(self.watchdog_usec),
            "OMP_NUM_THREADS": "2",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("WATCHDOG_PID", None)
        self._recorder.start()
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, driver], stdout=log, stderr=log, env=env
            )
        self.wait_for(lambda: self.ready_at() is not None, 120, "READY=1")

    def ready_at(self) -> float | None:
        return next((t for t, m in self.messages if m.startswith("READY=1")), None)

    def pings(self) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1"]

    def statuses(self) -> list[str]:
        return [line[7:] for _, m in self.messages for line in m.splitlines() if "STATUS=" in line]

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as reply:
            text = reply.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        return self.metrics().get(f"{name}{{{key}}}", 0.0)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.process is not None and self.process.poll() is not None:
                pytest.fail(f"serve exited waiting for {what}:\n{self.log_text()[-4000:]}")
            time.sleep(0.2)
        pytest.fail(
            f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_text()[-4000:]}"
        )

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(90)
        finally:
            self.close()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._done.set()
        if self._recorder.is_alive():
            self._recorder.join()
        self.notify.close()


def log_lines(text: str, component: str) -> list[str]:
    return [line for line in text.splitlines() if f"component={component} " in line]


def frames(count: int, seed: int = 0) -> np.ndarray:
    """`count` noisy 32×32 uint16 frames of one smooth scene."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    scene = 60 + 40 * np.sin(x / 5.0) * np.cos(y / 7.0)
    return rng.poisson(scene, size=(count, 32, 32)).astype(np.uint16)


@pytest.fixture
def serve(tmp_path):
    started: list[Serve] = []

    def make(store: Path | None = None, watchdog_seconds: float = 2.0, zmq: bool = False):
        started.append(Serve(tmp_path, store or tmp_path / "store", watchdog_seconds, zmq))
        return started[-1]

    yield make
    for daemon in started:
        daemon.close()


def wait_for_status(daemon, text: str) -> None:
    """Waits up to 10 s for a STATUS= line containing `text`."""
    daemon.wait_for(lambda: any(text in s for s in daemon.statuses()), 10, f"STATUS= {text!r}")


def test_a_stage_whose_work_always_raises_makes_the_daemon_unhealthy_with_few_lines(serve):
    daemon = serve(watchdog_seconds=2.0)  # pings every 1 s; unhealthy after 2 s silent
    daemon.start(inject=ALWAYS_FAILING_INFERENCE)
    ready = daemon.ready_at()
    wait_for_status(daemon, "UNHEALTHY: inference failing (error)")
    time.sleep(8)
    pings = daemon.pings()
    # At most a tick and the 2 s timeout after its first failure (at start), never again.
    assert pings and max(pings) - ready < 4.5, [round(p - ready, 1) for p in pings]
    assert time.monotonic() - max(pings) > 6
    assert daemon.metric("pn2v_live_stage_healthy", stage="inference") == 0
    assert daemon.metric("pn2v_live_stage_healthy", stage="trainer") == 1
    failures = daemon.metric("pn2v_live_stage_failures_total", stage="inference", reason="error")
    elapsed = time.monotonic() - ready
    assert 3 <= failures <= 2 + np.log2(elapsed), (failures, elapsed)  # backed off: 0, 1, 3, 7 s
    text = daemon.log_text()
    lines = log_lines(text, "inference")
    assert 2 <= len(lines) <= 4, lines  # its 1st, 2nd and 4th failure
    assert text.count("Traceback") == 1  # the first line only
    assert text.count("unhealthy, no WATCHDOG=1") == 1  # when it changed, not every tick
    assert daemon.stop() == 0


def test_a_killed_zmq_receiver_thread_makes_the_daemon_unhealthy(serve):
    daemon = serve(watchdog_seconds=2.0, zmq=True)
    daemon.start(inject=RECEIVER_FAULT)
    data = frames(5)
    with FrameSender(daemon.zmq) as sender:
        sender.send_stack("cells", data)
        daemon.wait_for(lambda: sender.missing("cells", 5) == [], 30, "5 frames stored")
        assert sender.status("cells")["refusing"] is None
        daemon.wait_for(lambda: len(daemon.pings()) >= 2, 10, "watchdog pings")
        assert sender.status("inject-fault", timeout=2) is None  # the thread died on it
        killed = time.monotonic()
        wait_for_status(daemon, "UNHEALTHY: zmq-receive dead (InjectedFault")
        time.sleep(4)
        assert max(daemon.pings()) - killed < 2.5  # the next tick saw it: no ping since
        assert sender.status("cells", timeout=1) is None  # nobody answers any more
    assert daemon.metric("pn2v_live_stage_healthy", stage="zmq-receive") == 0
    assert daemon.metric("pn2v_live_stage_healthy", stage="zmq-write-0") == 1
    text = daemon.log_text()
    assert "the ZeroMQ receiver stopped (InjectedFault: injected into the ZeroMQ receiver)" in text
    assert text.count("unhealthy, no WATCHDOG=1") == 1
    assert daemon.stop() == 0


def test_a_dead_metrics_server_thread_makes_the_daemon_unhealthy(serve):
    daemon = serve(watchdog_seconds=2.0)
    daemon.start(inject=METRICS_FAULT)
    assert daemon.metric("pn2v_live_stage_healthy", stage="metrics") == 1
    daemon.wait_for(lambda: len(daemon.pings()) >= 2, 10, "watchdog pings")
    with socket.create_connection(("127.0.0.1", daemon.metrics_port), timeout=5) as client:
        client.sendall(b"GET /inject-fault HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        killed = time.monotonic()
    wait_for_status(daemon, "UNHEALTHY: metrics dead (its thread ended)")
    time.sleep(4)
    assert max(daemon.pings()) - killed < 2.5  # the next tick saw it: no ping since
    assert "InjectedFault: injected into the metrics server" in daemon.log_text()
    assert daemon.log_text().count("unhealthy, no WATCHDOG=1") == 1
    assert daemon.stop() == 0


def test_sigterm_while_a_round_validates_abandons_it_and_exits_cleanly(serve, tmp_path):
    """SIGTERM after a round's steps, while it validates: the trainer stops between validation,
    baseline and gain estimate (nothing promoted), and the process exits 0 within the drain."""
    daemon = serve(zmq=True)
    marker = tmp_path / "round-validating"
    daemon.start(inject=SLOW_ROUND_END.format(marker=str(marker)))
    with FrameSender(daemon.zmq) as sender:
        sender.send_stack("cells", frames(12))
        daemon.wait_for(marker.exists, 60, "a round validating")
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(60) == 0  # the drain gives the trainer 60 s
    daemon.close()
    text = daemon.log_text()
    assert "stopped" in text and "did not finish" not in text
    assert re.search(r"round \d+ on", text) is None  # abandoned: not finished, not promoted
    assert ModelRegistry(daemon.store / "models").current() is None


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MiB tmpfs: a real file system that fills up (root only)."""
    require(os.geteuid() == 0, "mounting a small tmpfs as the store's disk needs root")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    require(result.returncode == 0, f"cannot mount a tmpfs here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full (ENOSPC); returns it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as file:
        for block in (1 << 20, 1 << 12):
            try:
                while True:
                    file.write(bytes(block))
            except OSError:
                pass
    return filler


FRAMES = 300
BURST = 200  # sent at once before the disk fills: a backlog for inference


def test_disk_full_refuses_pauses_and_everything_resumes_exactly_once(serve, small_disk):
    daemon = serve(store=small_disk / "store", watchdog_seconds=10.0, zmq=True)  # tick 2 s
    daemon.start()
    data = frames(FRAMES)
    with FrameSender(daemon.zmq) as sender:
        sender.send_stack("cells", data, indices=range(BURST))
        daemon.wait_for(
            lambda: (
                daemon.metric("pn2v_live_model_version") >= 1
                and daemon.metric("pn2v_live_backlog_frames") >= 30
            ),
            120,
            "a first model while frames still wait for inference",
        )
        filler = fill(small_disk)
        full_from, full_log = time.monotonic(), len(daemon.log_text())
        sender.send_stack("cells", data, indices=range(BURST, FRAMES), fps=20)  # during it
        refusing = daemon.wait_for(lambda: sender.status("cells")["refusing"], 10, "refusal")
        assert refusing["reason"] == "disk_full" and "resend" in refusing["detail"]
        daemon.wait_for(
            lambda: all(
                daemon.metric("pn2v_live_stage_failures_total", stage=stage, reason="disk_full")
                for stage in ("trainer", "inference", "zmq-write")
            ),
            60,
            "trainer, inference and ingest failing on the full disk",
        )
        time.sleep(max(0.0, full_from + 30 - time.monotonic()))  # 30 s of a full disk
        metrics = daemon.metrics()
        assert metrics["pn2v_live_disk_full{}"] == 1
        assert metrics["pn2v_live_frames_rejected_total{reason=disk_full,source=zmq}"] > 0
        assert any(s.startswith("DISK FULL: new frames refused") for s in daemon.statuses())
        full_text = daemon.log_text()[full_log:]
        freed_from = time.monotonic()
        filler.unlink()

        # Space is back: the sender's resend (the existing mechanism) stores what was refused.
        daemon.wait_for(lambda: sender.status("cells")["refusing"] is None, 10, "refusal over")
        sender.ensure_stored("cells", data, timeout=120)
        sender.end("cells", frames=FRAMES, confirm_timeout=30)
        daemon.wait_for(
            lambda: (
                daemon.metric("pn2v_live_frames_denoised_total", kind="new") == FRAMES
                and daemon.metric("pn2v_live_backlog_frames") == 0
            ),
            180,
            "every frame denoised",
        )
    metrics = daemon.metrics()
    assert metrics["pn2v_live_frames_ingested_total{source=zmq}"] == FRAMES  # each exactly once
    assert metrics["pn2v_live_frames_denoised_total{kind=new}"] == FRAMES
    assert metrics["pn2v_live_disk_full{}"] == 0
    daemon.wait_for(lambda: "DISK FULL" not in daemon.statuses()[-1], 10, "STATUS= recovered")

    # Trainer and inference backed off: a handful of lines each in 30 s, no traceback.
    for component in ("trainer", "inference", "zmq_source"):
        lines = log_lines(full_text, component)
        assert len(lines) <= 6, (component, lines)
    assert "Traceback" not in full_text
    assert "unhealthy" not in daemon.log_text()
    # The watchdog was fed all along (every 2 s tick): nothing stopped making progress.
    pings = [p for p in daemon.pings() if p >= daemon.ready_at()]
    gaps = np.diff([daemon.ready_at(), *pings, time.monotonic()])
    assert gaps.max() < 5, (gaps.max(), full_from - daemon.ready_at(), freed_from)
    text = daemon.log_text()
    assert re.search(r"component=trainer .*trainer works again after", text)
    assert re.search(r"component=inference .*inference works again after", text)
    assert "storing frames again" in text
    assert daemon.stop() == 0

    store = Store(small_disk / "store")
    try:
        acquisition = store.acquisition("cells")
        assert acquisition.stored_frames() == list(range(FRAMES))
        assert acquisition.closed
        raw = np.stack([acquisition.read_raw(t) for t in range(FRAMES)])
        np.testing.assert_array_equal(raw, data)
        assert all(acquisition.denoised_version(t) is not None for t in range(FRAMES))
    finally:
        store.close()
