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
import threading
from collections.abc import Callable

import torch

from pn2v_live.core.noise import NoiseModel
from pn2v_live.core.registration import Shifts
from pn2v_live.errors import UserError, writable_folder
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.pipeline.compute_turns import ComputeTurns
from pn2v_live.pipeline.folder_source import FolderSource
from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.pipeline.noise_refinement import NoiseRefiner, RefinementSettings, on_device
from pn2v_live.pipeline.publisher import DenoisedPublisher
from pn2v_live.pipeline.stage import Liveness
from pn2v_live.pipeline.trainer import Trainer, TrainerSettings
from pn2v_live.pipeline.zmq_source import ZmqSource
from pn2v_live.service.access import parse_bind
from pn2v_live.service.commands.camera_options import trained_maps_id, with_camera_maps
from pn2v_live.service.config import Config
from pn2v_live.service.daemon_devices import daemon_devices
from pn2v_live.service.daemon_noise_model import (
    newest_noise_model,
    refines,
    warn_if_other_model_maps,
)
from pn2v_live.service.daemon_status import HealthCheck, health_reports, status_line, status_of
from pn2v_live.service.metrics_server import start_metrics_server
from pn2v_live.service.native_memory import Trimmer
from pn2v_live.service.notify import SystemdNotifier
from pn2v_live.service.stop_request import StopRequest
from pn2v_live.service.viewer import ViewerServer
from pn2v_live.storage.checkpoints import load_denoiser
from pn2v_live.storage.noise_model_file import load_noise_model
from pn2v_live.storage.noise_model_versions import FOLDER as VERSIONS_FOLDER
from pn2v_live.storage.noise_model_versions import NoiseModelVersions
from pn2v_live.storage.registry import ModelRegistry, content_id
from pn2v_live.storage.store import Store
from pn2v_live.telemetry import NOISE_MODEL_SIGNAL_MAX

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
        trimmer = Trimmer()  # what torch frees goes back to the system (native_memory)
        if trimmer.start():
            self._closers.append(trimmer.stop)
        inference_device, trainer_device = self._devices()
        # both on the CPU: training steps and frames take turns on one thread (compute_turns)
        turns = ComputeTurns.for_devices(inference_device, trainer_device, c.inference.scheduler)
        self._closers.append(turns.close)  # runs after the stages' stops (last in, first out)
        # checked before anything starts
        noise_model = with_camera_maps(load_noise_model(c.noise_model.path), c.camera.maps)
        self.camera = CameraFrames(noise_model, c.camera.sensor_origin)
        self.shifts = Shifts()  # frame shifts, measured once for inference, trainer and refiner
        self.refine = refines(c.noise_model, self.camera)
        registry = self._open_store()
        calibrated_id = content_id(c.noise_model.path)
        self.noise_versions = NoiseModelVersions(c.store.root / VERSIONS_FOLDER)
        noise_model, noise_model_id = newest_noise_model(
            c.noise_model, self.noise_versions, noise_model, calibrated_id, self.refine
        )
        self._import_initial_model(registry)
        warn_if_other_model_maps(registry, self.camera)
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
            warm_up_k=c.trainer.k,
            shifts=self.shifts,
            turns=turns,
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
            shifts=self.shifts,
            turns=turns,
        )
        self._start_refiner(noise_model, noise_model_id)
        self._start_metrics()
        self._start_publisher()
        self._start_viewer()
        if self.refiner is not None:
            self.inference.out_of_range_advice = (
                "the noise model will be refined from the stream once enough such frames are "
                "stored (noise_model.refine; a log line says when)"
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
        """The inference and trainer devices; `devices` describes them (`daemon_devices`)."""
        inference, trainer, self.devices = daemon_devices(self.config)
        return inference, trainer

    def _open_store(self) -> ModelRegistry:
        """Open the store as its one writer, and its model registry; UserError when store.root
        cannot be created or written."""
        root = self.config.store.root
        with writable_folder("store.root", root):
            self.store = Store(root, self.config.store.zarr_format, writer=True)
            self._closers.append(self.store.close)
            return ModelRegistry(root / "models", self.config.model.keep_versions)

    def _start_refiner(self, noise_model: NoiseModel, noise_model_id: str) -> None:
        """The stage that refines the noise model from the stream (`noise_model.refine`); it
        follows the stored frames and hands new versions to inference and the trainer."""
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
            self.store,
            self.noise_versions,
            noise_model,
            noise_model_id,
            content_id(c.path),
            RefinementSettings(c.refine_every_frames, c.refine_every_seconds, c.refine_min_pairs),
            [self.inference.use_noise_model, self.trainer.use_noise_model],
            shifts=self.shifts,
        )

    def _import_initial_model(self, registry: ModelRegistry) -> None:
        """Make `[model] initial` version 1 when the registry has no promoted model yet."""
        initial = self.config.model.initial
        if initial is None or registry.current() is not None:
            return
        denoiser, metadata = load_denoiser(initial)
        info = registry.promote(
            denoiser,
            validation_loss=None,
            training_frames=0,
            training_steps=0,
            noise_model_id=None,
            source=str(initial),
            camera_maps_id=trained_maps_id(metadata),  # as `train` recorded it
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
        check = HealthCheck(self.notifier)
        try:
            while not self._stop.wait(tick):
                reports = self.health()
                check.tick(reports, self.status_line(reports))
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
        folder watcher, the ZeroMQ receiver and writers, the viewer's and the metrics' servers
        (`daemon_status.health_reports`)."""
        parts = [self.inference, self.trainer, self.refiner, *self.sources]
        return health_reports(parts, self._listeners, self.max_silence)

    def status(self) -> dict:
        """What the viewer's /api/status shows (`daemon_status.status_of`)."""
        reports = self.health()
        noise_model = self.noise_model_status()
        return status_of(self.inference, self.trainer, noise_model, self.devices, reports)

    def noise_model_status(self) -> dict:
        """The noise model in use (id, kind, signal range, what it was refined from, the id of
        the sCMOS camera maps applied with it) and the refinements: whether they are on, how
        many this run, the latest one's record."""
        maps = {"camera_maps_id": self.camera.maps_id if self.camera else None}
        if self.refiner is not None:
            return {**self.refiner.status(), **maps, "refine": True}
        return {
            **self._noise_model_status,
            **maps,
            "refinements": 0,
            "last_refinement": None,
            "refine": self.config.noise_model.refine,
        }

    def status_line(self, reports: list[Liveness] | None = None) -> str:
        """systemd's STATUS= (`daemon_status.status_line`)."""
        status = self.status()
        return status_line(status, self.health() if reports is None else reports)


def serve(config: Config) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns after a clean drain."""
    daemon = Daemon(config)
    daemon.start()
    daemon.run()
