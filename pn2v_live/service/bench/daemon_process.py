"""The daemon under a bench: `pn2v-live serve` in a subprocess (what users run) on IPC sockets
in a private folder, with the bench's own settings, waited for until its status socket answers,
and stopped with SIGTERM so that it drains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pn2v_live.errors import UserError

if TYPE_CHECKING:
    from pn2v_live.wire.sender import FrameSender

START_TIMEOUT_S = 300.0  # the daemon's start-up (imports, noise model, sockets, dask)
STOP_TIMEOUT_S = 300.0  # its drain after SIGTERM (the frames in flight, then the store)
LOG_TAIL_LINES = 20
SEND_TIMEOUT_S = 60.0  # one frame may wait this long for the receiver's backpressure
PROBE_ACQUISITION = "live"  # asked for in the readiness probe: any name, the answer is enough
# Keys the bench sets itself: the store it reads, the noise model it was given, the sockets it
# sends to. The viewer, metrics and publisher get free ports, which `--set` may override.
RESERVED_KEYS = ("store.root", "noise_model.path", "ingest.zmq.bind", "ingest.zmq.status_bind")


@dataclass(frozen=True)
class Endpoints:
    """Where the daemon receives frames and answers status requests (IPC sockets in a private
    temporary folder: no port to collide with another daemon)."""

    frames: str
    status: str

    @classmethod
    def in_folder(cls, folder: Path) -> Endpoints:
        return cls(f"ipc://{folder / 'frames'}", f"ipc://{folder / 'status'}")


class SenderThread(threading.Thread):
    """A thread sending to the daemon at `endpoints` through one `FrameSender`: `send` (in
    subclasses) once it is connected. `started` is set once it is (`started_at`: monotonic time
    then) or when it ended without; `error` is what stopped it early, if anything."""

    def __init__(self, name: str, endpoints: Endpoints) -> None:
        super().__init__(name=name, daemon=True)
        self.endpoints = endpoints
        self.started = threading.Event()
        self.started_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from pn2v_live.wire.sender import FrameSender

        try:
            with FrameSender(
                self.endpoints.frames, self.endpoints.status, send_timeout=SEND_TIMEOUT_S
            ) as sender:
                self.started_at = time.monotonic()
                self.started.set()
                self.send(sender)
        except BaseException as error:  # reported by the caller
            self.error = error
        finally:
            self.started.set()

    def send(self, sender: FrameSender) -> None:
        """Send what this thread sends (the sender is connected)."""
        raise NotImplementedError


def work_folders(cleanup: ExitStack, keep: Path | None, prefix: str) -> tuple[Path, Path]:
    """(sockets, work): a private temporary folder (named `prefix`…, removed by `cleanup`) for
    the daemon's IPC sockets, and the folder for its store and log: `keep` when given (created;
    a UserError when it holds a store already), else the sockets' folder."""
    sockets = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    work = keep.resolve() if keep is not None else sockets
    if keep is not None and (work / "store").exists():
        raise UserError(f"--keep {work}: {work / 'store'} exists; give a new folder")
    work.mkdir(parents=True, exist_ok=True)
    return sockets, work


def daemon_overrides(
    store_root: Path, noise_model: Path, endpoints: Endpoints, user: list[str], part: str = "live"
) -> list[str]:
    """`--set` overrides for `pn2v-live serve`: the bench's own keys, free ports for the other
    listeners, then the user's overrides (which win, except for RESERVED_KEYS: UserError naming
    the bench `part`)."""
    for override in user:
        key = override.partition("=")[0].strip()
        if key in RESERVED_KEYS:
            raise UserError(
                f"--set {override!r}: the {part} bench sets {key} itself "
                "(--keep DIR keeps the store, --noise-model-file names the noise model)"
            )
    own = {
        "store.root": store_root,
        "noise_model.path": noise_model.resolve(),
        "ingest.zmq.bind": endpoints.frames,
        "ingest.zmq.status_bind": endpoints.status,
        "metrics.bind": "127.0.0.1:0",
        "viewer.bind": "127.0.0.1:0",
        "publish.bind": "tcp://127.0.0.1:*",
    }
    return [f"{key}={json.dumps(str(value))}" for key, value in own.items()] + list(user)


def start_daemon(overrides: list[str], log_path: Path) -> subprocess.Popen:
    """`pn2v-live serve --set …` in a subprocess, its log lines going to `log_path`. The daemon
    imports the same pn2v_live as this process, never one in the working directory (`-P`)."""
    command = [sys.executable, "-P", "-m", "pn2v_live", "serve"]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_until_ready(process: subprocess.Popen, endpoints: Endpoints, log_path: Path) -> None:
    """Block until the daemon's status socket answers (its sources start last but for inference
    and training); UserError with the log's tail when it exits or takes over START_TIMEOUT_S."""
    from pn2v_live.wire.sender import FrameSender

    deadline = time.monotonic() + START_TIMEOUT_S
    with FrameSender(endpoints.frames, endpoints.status) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise UserError(
                    f"the daemon exited with code {process.returncode} at start-up:\n"
                    + log_tail(log_path)
                )
            if probe.status(PROBE_ACQUISITION, timeout=1.0) is not None:
                return
    raise UserError(
        f"the daemon did not start within {START_TIMEOUT_S:.0f} s:\n{log_tail(log_path)}"
    )


def stop_daemon(process: subprocess.Popen) -> int:
    """SIGTERM, wait for the drain (SIGKILL after STOP_TIMEOUT_S); the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of the daemon's log."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM (e.g. from `timeout`) raises KeyboardInterrupt in the main thread,
    so the clean-up stops the daemon instead of leaving it running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
