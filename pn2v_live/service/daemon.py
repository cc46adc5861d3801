"""The daemon's lifecycle: start every part from the config, report to systemd, drain on SIGTERM.

Start order: noise model and devices → store and model registry (importing `[model] initial`
when nothing is promoted yet) → dask scheduler → metrics, publisher and viewer sockets →
promoted model loaded → ingest sources → inference and trainer → READY=1. Any failure before
READY is a UserError with one line saying what and how to fix it. SIGTERM/SIGINT drain: sources
stop accepting (what they already received is stored), the trainer abandons its round,
inference finishes the frames in flight, then the store and ledger are closed and `run` returns.
The signal handlers are installed first thing in `start` (see `StopRequest`: they take no lock): a
signal during start-up lets start-up finish, then `run` drains at once.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Callable

import torch

from pn2v_live import __version__
from pn2v_live.core.device import (
    describe_device,
    device_name,
    precision_name,
    resolve_device,
    torch_build,
    unusable_gpu_warning,
)
from pn2v_live.core.model import PRECISIONS
from pn2v_live.core.noise import NoiseModel
from pn2v_live.errors import UserError
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.pipeline.folder_source import FolderSource
from pn2v_live.pipeline.inference import FrameListener, InferenceScheduler
from pn2v_live.pipeline.noise_refinement import NoiseRefiner, RefinementSettings, on_device
from pn2v_live.pipeline.publisher import DenoisedPublisher
from pn2v_live.pipeline.stage import Liveness, thread_liveness
from pn2v_live.pipeline.trainer import Trainer, TrainerSettings
from pn2v_live.pipeline.zmq_source import ZmqSource
from pn2v_live.service.access import parse_bind
from pn2v_live.service.commands.camera_options import with_camera_maps
from pn2v_live.service.config import Config
from pn2v_live.service.metrics_server import start_metrics_server
from pn2v_live.service.notify import SystemdNotifier
from pn2v_live.service.stop_request import StopRequest
from pn2v_live.service.viewer import ViewerServer
from pn2v_live.storage.checkpoints import load_denoiser
from pn2v_live.storage.noise_model_file import load_noise_model
from pn2v_live.storage.noise_model_versions import FOLDER as VERSIONS_FOLDER
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.registry import ModelRegistry, content_id
from pn2v_live.storage.store import Store
from pn2v_live.telemetry import BUILD_INFO, DISK_FULL, NOISE_MODEL_SIGNAL_MAX, STAGE_HEALTHY

log = logging.getLogger("pn2v_live.daemon")

TICK_SECONDS = 2.0  # status and health check period
UNWATCHED_SILENCE = 300.0  # a stage silent this long is stuck (without systemd's watchdog)


class Daemon:
    """Everything `pn2v-live serve` runs; `start()` then `run()` (blocks until a signal)."""

    def __init__(self, config: Config, notifier: SystemdNotifier | None = None):
        self.config = config
        self.notifier = notifier or SystemdNotifier()
        self._stop = StopRequest()
        self._closers: list[Callable[[], object]] = []  # run in reverse order at shutdown
        self.store: Store | None = None
        self.inference: InferenceScheduler | None = None
        self.trainer: Trainer | None = None
        self.refiner: NoiseRefiner | None = None  # None with noise_model.refine = false
        self.noise_versions: NoiseModelVersions | None = None
        self.camera: CameraFrames | None = None  # sCMOS camera maps, once started
        self.refine = False  # whether the noise model is refined from the stream, once started
        self._noise_model_status: dict = {}
        self.viewer = None
        self.sources: list = []
        self._listeners: dict[str, threading.Thread] = {}  # server loops under the health check
        self.addresses: dict[str, str] = {}  # where each listener really is, once started
        # What runs where: "inference" and "training" ("cuda:0 (NVIDIA H200), bfloat16"),
        # "torch" (its version and build) and "warning" (an NVIDIA GPU torch cannot use, or None).
        self.devices: dict[str, str | None] = {}

    # ---- start --------------------------------------------------------------------------

    def start(self) -> None:
        """Bring every part up; UserError (after undoing what started) if one cannot start."""
        if threading.current_thread() is threading.main_thread():  # signal() works only there
            self._stop.install()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        c = self.config
        inference_device, trainer_device = self._devices()
        # checked before anything starts
        noise_model = with_camera_maps(load_noise_model(c.noise_model.path), c.camera.maps)
        self.camera = CameraFrames(noise_model, c.camera.sensor_origin)
        self.refine = self._refines()
        registry = self._open_store()
        noise_model, noise_model_id = self._newest_noise_model(noise_model)
        self._import_initial_model(registry)
        self.inference = InferenceScheduler(
            self.store,
            registry,
            on_device(noise_model, inference_device),
            inference_device,
            scheduler=c.inference.scheduler,
            max_in_flight=c.inference.max_in_flight,
            tile=c.inference.tile,
            compiled=c.inference.compile,
            precision=c.inference.precision,
            backfill_hours=c.inference.backfill_hours,
            camera=self.camera,
        )
        self._closers.append(self.inference.stop)  # closes the dask client if start fails
        self.trainer = Trainer(
            self.store,
            registry,
            on_device(noise_model, trainer_device),
            noise_model_id,
            TrainerSettings(**c.trainer.model_dump(exclude={"device"})),
            trainer_device,
            self.inference.idle,
            camera=self.camera,
        )
        self._start_refiner(noise_model, noise_model_id)
        self._start_metrics()
        self._start_publisher()
        self._start_viewer()
        if self.refiner is not None:  # after the publisher: both see every denoised frame
            self.inference.on_frame = _and_offer(self.inference.on_frame, self.refiner.offer)
            self.inference.out_of_range_advice = (
                "the noise model will be refined from the stream once enough such frames are "
                "denoised (noise_model.refine; a log line says when)"
            )
        # Closers run last-in first-out: at shutdown the sources stop accepting first, then the
        # trainer abandons its round, then inference finishes its in-flight frames.
        self._closers += [self.inference.stop, self.trainer.stop]
        self.inference.load_current_model()
        self._start_sources()
        self.inference.start()
        self.trainer.start()
        if self.refiner is not None:
            self.refiner.start()
            self._closers.append(self.refiner.stop)
        log.info("serving store %s; %s", c.store.root, self.status_line())
        self.notifier.ready(self.status_line())

    def _devices(self) -> tuple[torch.device, torch.device]:
        """The inference and trainer devices (a UserError when one is not on this machine);
        `devices` describes them, the log and `pn2v_live_build_info` say what they are."""
        c = self.config
        inference = resolve_device(c.inference.device, "inference.device")
        trainer = (  # the same setting twice: one resolution, one warning
            inference
            if c.trainer.device == c.inference.device
            else resolve_device(c.trainer.device, "trainer.device")
        )
        inference_bf16 = PRECISIONS[c.inference.precision]
        where = "" if c.inference.scheduler == "local" else f" (dask at {c.inference.scheduler})"
        auto_on_cpu = any(
            setting == "auto" and device.type == "cpu"
            for setting, device in ((c.inference.device, inference), (c.trainer.device, trainer))
        )
        self.devices = {
            "inference": describe_device(inference, inference_bf16) + where,
            "training": describe_device(trainer, PRECISIONS[c.trainer.precision]),
            "torch": torch_build(),
            "warning": unusable_gpu_warning() if auto_on_cpu else None,
        }
        log.info(
            "inference on %s; training on %s; %s",
            self.devices["inference"],
            self.devices["training"],
            self.devices["torch"],
        )
        BUILD_INFO.info(
            {
                "version": __version__,
                "torch": self.devices["torch"].removeprefix("torch "),
                "device": device_name(inference) + where,
                "precision": precision_name(inference, inference_bf16),
            }
        )
        return inference, trainer

    def _open_store(self) -> ModelRegistry:
        """Open the store as its one writer, and its model registry; UserError when store.root
        cannot be created or written."""
        root = self.config.store.root
        try:
            self.store = Store(root, self.config.store.zarr_format, writer=True)
            self._closers.append(self.store.close)
            return ModelRegistry(root / "models", self.config.model.keep_versions)
        except (OSError, sqlite3.Error) as error:
            reason = getattr(error, "strerror", None) or error
            raise UserError(
                f"store.root {root}: cannot create or write it ({reason}); choose a folder "
                "this user may write"
            ) from error

    def _newest_noise_model(self, calibrated: NoiseModel) -> tuple[NoiseModel, str]:
        """The noise model to start with, and its id: the newest version refined from the
        configured file (`noise_model.refine`), else that file's model."""
        c = self.config.noise_model
        calibrated_id = content_id(c.path)
        self.noise_versions = NoiseModelVersions(self.config.store.root / VERSIONS_FOLDER)
        newest = self.noise_versions.newest(calibrated_id) if self.refine else None
        if newest is None:
            if not c.refine and self.noise_versions.versions(calibrated_id):
                log.info(
                    "noise_model.refine is off: using %s as calibrated, not its refined versions "
                    "in %s",
                    c.path,
                    self.noise_versions.folder,
                )
            return calibrated, calibrated_id
        version, model = newest
        log.info(
            "using noise model %s, refined from %s (generation %d, signal range %.0f–%.0f ADU, "
            "calibrated %.0f–%.0f ADU); noise_model.refine = false uses %s alone",
            version.id,
            c.path,
            version.generation,
            *model.signal_range,
            *calibrated.signal_range,
            c.path,
        )
        return model, version.id

    def _start_refiner(self, noise_model: NoiseModel, noise_model_id: str) -> None:
        """The stage that refines the noise model from the stream (`noise_model.refine`); it
        sees every denoised frame and hands new versions to inference and the trainer."""
        c = self.config.noise_model
        self._noise_model_status = {
            "id": noise_model_id,
            "kind": noise_model.kind,
            "signal_range": list(noise_model.signal_range),
            "refined_from": (noise_model.metadata.get("refinement") or {}).get("parent"),
        }
        NOISE_MODEL_SIGNAL_MAX.set(noise_model.signal_range[1])
        if not self.refine:
            return
        self.refiner = NoiseRefiner(
            self.noise_versions,
            noise_model,
            noise_model_id,
            content_id(c.path),
            RefinementSettings(c.refine_every_frames, c.refine_every_seconds, c.refine_min_pairs),
            [self.inference.use_noise_model, self.trainer.use_noise_model],
        )

    def _refines(self) -> bool:
        """Whether the noise model is refined from the stream: `noise_model.refine`, and not with
        sCMOS camera maps (a refined model would lose them; logged)."""
        if self.config.noise_model.refine and self.camera.maps is not None:
            log.info("noise_model.refine is not done with sCMOS camera maps; using %s as it is",
                     self.config.noise_model.path)  # fmt: skip
            return False
        return self.config.noise_model.refine

    def _import_initial_model(self, registry: ModelRegistry) -> None:
        """Make `[model] initial` version 1 when the registry has no promoted model yet."""
        initial = self.config.model.initial
        if initial is None or registry.current() is not None:
            return
        denoiser, _ = load_denoiser(initial)
        info = registry.promote(
            denoiser,
            validation_loss=None,
            training_frames=0,
            training_steps=0,
            noise_model_id=None,
            source=str(initial),
        )
        log.info("imported initial model %s as version %d", initial, info.version)

    def _start_metrics(self) -> None:
        bind = self.config.metrics.bind
        if not bind:
            return
        host, port = parse_bind(bind, "metrics.bind")
        metrics = self.config.metrics
        try:
            server = start_metrics_server(host, port, metrics.token, metrics.allowed_hosts)
        except OSError as error:
            raise UserError(
                f"metrics.bind {bind}: cannot listen ({error.strerror or error}); choose another "
                "port or stop the program using it"
            ) from error
        self._closers += [server.server_close, server.shutdown]  # shutdown runs first
        self._listeners["metrics"] = server.thread
        self.addresses["metrics"] = f"http://{host}:{server.server_port}/metrics"
        log.info("metrics at %s", self.addresses["metrics"])

    def _start_publisher(self) -> None:
        """ZeroMQ PUB of denoised frames ([publish] bind); inference hands it every frame."""
        if not self.config.publish.bind:
            return
        publisher = DenoisedPublisher(self.config.publish.bind)
        publisher.start()
        self._closers.append(publisher.stop)
        self.addresses["publish"] = publisher.bind
        self.inference.on_frame = publisher.publish

    def _start_viewer(self) -> None:
        if not self.config.viewer.bind:
            return
        viewer = self.config.viewer
        self.viewer = ViewerServer(
            self.store,
            viewer.bind,
            self.status,
            token=viewer.token,
            allowed_hosts=viewer.allowed_hosts,
            max_streams=viewer.max_streams,
            max_connections=viewer.max_connections,
        )
        self.viewer.start()
        self._closers.append(self.viewer.stop)
        self._listeners["viewer"] = self.viewer._thread
        self.addresses["viewer"] = self.viewer.url

    def _start_sources(self) -> None:
        """The ZeroMQ receiver and folder watcher, each only when configured."""
        ingest = self.config.ingest
        if ingest.zmq.bind:
            self.sources.append(
                ZmqSource(
                    self.store,
                    ingest.zmq.bind,
                    ingest.zmq.status_bind,
                    queue_bytes=ingest.zmq.queue_mib << 20,
                    check=self.camera.admit,
                )
            )
        if ingest.folder.paths:
            self.sources.append(
                FolderSource(
                    self.store,
                    ingest.folder.paths,
                    polling=ingest.folder.polling,
                    stable_seconds=ingest.folder.stable_seconds,
                    pattern=ingest.folder.pattern,
                    check=self.camera.admit,
                )
            )
        for source in self.sources:
            source.start()
            self._closers.append(source.stop)
            if isinstance(source, ZmqSource):
                self.addresses |= {"frames": source.bind, "frames_status": source.status_bind}

    # ---- run ----------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or `request_stop`), then drain and close (also when the
        loop fails). Every tick: the health check (`health`) — WATCHDOG=1 only while every
        thread is healthy, one log line when that changes — and STATUS= when it changed."""
        interval = self.notifier.watchdog_interval
        tick = min(TICK_SECONDS, interval) if interval else TICK_SECONDS
        last_status, last_problems = None, []
        try:
            while not self._stop.wait(tick):
                reports = self.health()
                problems = [report for report in reports if not report.healthy]
                if not problems:
                    self.notifier.watchdog()
                key = [(report.name, report.state) for report in problems]
                if key != last_problems:
                    if problems:
                        log.error(
                            "unhealthy, no WATCHDOG=1 until it recovers: %s",
                            "; ".join(str(report) for report in problems),
                        )
                    else:
                        log.info("healthy again: every thread makes progress")
                    last_problems = key
                status = self.status_line(reports)
                if status != last_status:
                    self.notifier.status(status)
                    last_status = status
        finally:
            self.drain()

    def request_stop(self) -> None:
        """Make `run` drain and return, as SIGTERM does (callable from any thread)."""
        self._stop.set()

    def drain(self) -> None:
        """Stop accepting, finish in-flight frames, flush and close everything."""
        self.notifier.stopping("draining: finishing in-flight frames")
        log.info("draining")
        self.close()
        log.info("stopped")

    def close(self) -> None:
        """Undo everything started so far (idempotent)."""
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:
                log.exception("while shutting down")
        self.notifier.close()
        self._stop.uninstall()

    # ---- status -------------------------------------------------------------------------

    @property
    def max_silence(self) -> float:
        """Seconds without progress after which a thread is unhealthy: twice the watchdog
        interval (WatchdogSec) under systemd, else UNWATCHED_SILENCE."""
        interval = self.notifier.watchdog_interval
        return 2 * interval if interval else UNWATCHED_SILENCE

    def health(self) -> list[Liveness]:
        """The liveness of every long-running thread — inference, trainer, noise refiner,
        folder watcher, the ZeroMQ receiver and writers, the viewer's and the metrics' servers —
        also exported as pn2v_live_stage_healthy{stage} and pn2v_live_disk_full."""
        parts = [self.inference, self.trainer, self.refiner, *self.sources]
        reports = [
            report
            for part in parts
            if hasattr(part, "health_reports")
            for report in part.health_reports(self.max_silence)
        ]
        reports += [thread_liveness(name, thread) for name, thread in self._listeners.items()]
        for report in reports:
            STAGE_HEALTHY.labels(report.name).set(report.healthy)
        DISK_FULL.set(any(_disk_full(report) for report in reports))
        return reports

    def status(self) -> dict:
        """What the viewer's /api/status shows."""
        reports = self.health()
        inference, trainer = self.inference, self.trainer
        model = inference.model if inference else None
        return {
            "model_version": model.version if model else None,
            "model_source": (model.source if model else "waiting for the first trained model"),
            "model_context": inference.context if inference else None,
            "model_estimated_gain_db": model.estimated_gain_db if model else None,
            "model_estimated_gain_uncertainty_db": (
                model.estimated_gain_uncertainty_db if model else None
            ),
            "waiting_for_model": inference.waiting_for_model if inference else True,
            "backlog": inference.backlog if inference else 0,
            # frames that do not read back or denoise, each retried on its own back-off
            "failed_frames": (
                inference.frame_failures.report() if inference else {"count": 0, "frames": []}
            ),
            "training_rounds": trainer.rounds if trainer else 0,
            "trainer_state": trainer.state if trainer else "idle",
            "loss_history": list(trainer.history) if trainer else [],
            "noise_model": self.noise_model_status(),
            "healthy": all(report.healthy for report in reports),
            "disk_full": any(_disk_full(report) for report in reports),
            "health": [report.as_dict() for report in reports],
            "device": self.devices,
        }

    def noise_model_status(self) -> dict:
        """The noise model in use (id, kind, signal range, what it was refined from) and the
        refinements: whether they are on, how many this run, the latest one's record."""
        if self.refiner is not None:
            return {**self.refiner.status(), "refine": True}
        return {
            **self._noise_model_status,
            "refinements": 0,
            "last_refinement": None,
            "refine": self.config.noise_model.refine,
        }

    def status_line(self, reports: list[Liveness] | None = None) -> str:
        """systemd's STATUS=: what is wrong first (unhealthy threads, a full disk, failures
        being retried), then model, backlog and trainer."""
        status = self.status()
        model = (
            f"model v{status['model_version']} (context {status['model_context']})"
            if status["model_version"]
            else "waiting for the first model"
        )
        line = (
            f"{model}, backlog {status['backlog']} frames, {status['training_rounds']} rounds, "
            f"trainer {status['trainer_state']}"
        )
        if self.devices:
            line += f"; inference on {self.devices['inference']}"
        return _health_line(self.health() if reports is None else reports) + line


def _disk_full(report: Liveness) -> bool:
    return report.state == "paused" and report.reason == "disk_full"


def _short(report: Liveness) -> str:
    """E.g. "trainer failing (disk_full)", "zmq-receive dead (InjectedFault: ...)"."""
    why = report.detail if report.state == "dead" else report.reason
    return f"{report.name} {report.state}" + (f" ({why})" if why else "")


def _health_line(reports: list[Liveness]) -> str:
    """The start of the STATUS= line: e.g. "UNHEALTHY: zmq-receive dead (InjectedFault: ...);
    DISK FULL: new frames refused, paused: zmq-write, trainer; " ("" when all is well). Names
    and states only (no times), so the line changes only when the health does."""

    def names(selected: list[Liveness]) -> str:
        return ", ".join(dict.fromkeys(re.sub(r"-\d+$", "", r.name) for r in selected))

    unhealthy = [r for r in reports if not r.healthy]
    paused = [r for r in reports if _disk_full(r)]
    retrying = [r for r in reports if r.state == "retrying"]
    parts = []
    if unhealthy:
        parts.append("UNHEALTHY: " + ", ".join(map(_short, unhealthy)))
    if paused:
        refusing = any(r.name.startswith("zmq-write") for r in paused)
        parts.append(
            "DISK FULL: "
            + ("new frames refused, " if refusing else "")
            + f"paused: {names(paused)}"
        )
    if retrying:
        parts.append("retrying after failures: " + names(retrying))
    return "".join(f"{part}; " for part in parts)


def _and_offer(listener: FrameListener | None, offer: Callable) -> FrameListener:
    """A frame listener calling `listener` (if any), then `offer(acquisition, t, denoised)`."""

    def on_frame(acquisition, t, denoised, version):
        if listener is not None:
            listener(acquisition, t, denoised, version)
        offer(acquisition, t, denoised)

    return on_frame


def serve(config: Config) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns after a clean drain."""
    daemon = Daemon(config)
    daemon.start()
    daemon.run()
