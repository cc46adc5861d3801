"""The inference stage: MMSE-denoises every stored raw frame with the promoted model, via dask.

Each pass picks up to `max_in_flight` frames and runs one dask task per frame (MMSE of one
frame with the current model); the stage reads the raw chunks before and writes the denoised
chunks with the model version after. Frames without a denoised twin come first, newest first
(open acquisitions before closed ones), so the live view stays current while the rest catch up;
only when none is left are frames re-denoised (back-fill), in acquisitions whose newest frame is
under `backfill_hours` old: first the live twins of a model with temporal context, once the later
frames of their window are stored, then frames denoised by an older model. A newly promoted model
is picked up between passes (hot swap). Before the first model exists, frames wait in the store
and `waiting_for_model` is set; meanwhile the stage warms up once on one of them
(`frame_denoising.warm_up`).

A model with temporal context `before:after` sees frames t−before … t+after. A frame's first
(live) twin is made as soon as it is stored, with the frames after it hidden (window
`before:0`) unless they are stored already; the refined twin with the whole window replaces it
once they are (or the acquisition is closed). The ledger records which window made each twin.

`scheduler` is "local" (dask's threaded scheduler inside the daemon) or the address of a
dask.distributed scheduler; the model and noise model are then sent to the workers once per
version and only frames travel per task.

With sCMOS camera maps (`camera`), frames are equalised as they are read, and each task gets its
pixels' read-noise variance for the per-pixel likelihood (`core.camera`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import dask
import numpy as np
import torch

from pn2v_live.core.context import SPATIAL, Context, window
from pn2v_live.core.model import PRECISIONS, Denoiser
from pn2v_live.core.noise.base import NoiseModel
from pn2v_live.core.noise.coverage import WARN_FRACTION
from pn2v_live.core.registration import Shifts
from pn2v_live.errors import UserError
from pn2v_live.pipeline.camera_frames import CameraFrames
from pn2v_live.pipeline.compute_turns import ComputeTurns
from pn2v_live.pipeline.frame_denoising import denoise_frame, warm_up
from pn2v_live.pipeline.frame_failures import FrameFailures
from pn2v_live.pipeline.noise_refinement import Handover, on_device
from pn2v_live.pipeline.stage import Stage
from pn2v_live.storage.acquisition import Acquisition
from pn2v_live.storage.registry import ModelInfo, ModelRegistry
from pn2v_live.storage.store import Store
from pn2v_live.storage.working_set import WorkingSet
from pn2v_live.telemetry import (
    BACKLOG,
    FRAMES_DENOISED,
    FRAMES_UNREADABLE,
    INFERENCE_SECONDS,
    MODEL_ESTIMATED_GAIN,
    MODEL_ESTIMATED_GAIN_UNCERTAINTY,
    MODEL_VERSION,
    SIGNAL_OUT_OF_CALIBRATION,
)

# Called after each denoised frame is written: (acquisition, t, denoised float32 (Y, X), version).
FrameListener = Callable[[Acquisition, int, np.ndarray, int], None]


@dataclass(frozen=True)
class Job:
    """One frame to denoise with the frames `window` around it; `kind` is "new" (no twin yet),
    "refined" (a live twin gets its whole window) or "backfill" (a twin of an older model)."""

    acquisition: Acquisition
    t: int
    kind: str
    window: Context


def default_in_flight(scheduler: str, device: torch.device) -> int:
    """Frames denoised at once when the config leaves it open: 1 on the local CPU (torch already
    uses every core for one frame; more would only multiply memory), 4 on a GPU or a cluster."""
    return 1 if scheduler == "local" and device.type == "cpu" else 4


class InferenceScheduler(Stage):
    """Denoises frames as they are stored; `idle` is set while no fresh frame waits."""

    def __init__(
        self,
        store: Store,
        registry: ModelRegistry,
        noise_model: NoiseModel,
        device: torch.device,
        scheduler: str = "local",
        max_in_flight: int | None = None,
        tile: int | None = None,
        on_frame: FrameListener | None = None,
        compiled: bool = False,
        precision: str = "auto",
        backfill_hours: float = 12.0,
        camera: CameraFrames | None = None,  # sCMOS camera maps (None: frames as they are)
        warm_up_k: int | None = None,  # the trainer's K: warm up on a frame before its first model
        shifts: Shifts | None = None,  # frame shifts measured (shared with other stages)
        turns: ComputeTurns | None = None,  # shared with the trainer on a CPU (compute_turns)
    ):
        super().__init__("inference", idle_seconds=0.1, disk_path=store.root)
        self.store, self.registry, self.device = store, registry, device
        self.noise_model, self.tile = noise_model, tile
        self.camera = camera or CameraFrames(noise_model)
        self.max_in_flight = max_in_flight or default_in_flight(scheduler, device)
        self.compiled = compiled
        self.bf16 = PRECISIONS[precision]  # U-Net body in bfloat16 (True), float32, or native
        # acquisitions with frames to denoise, or back-filled: their newest frame is under
        # `backfill_hours` old (older ones keep the denoised frames people may have analysed)
        self.working = WorkingSet(store, 3600 * backfill_hours)
        self.on_frame = on_frame
        self.idle = threading.Event()
        self.model: ModelInfo | None = None
        self.waiting_for_model = True
        self.backlog = 0
        self._denoiser: Denoiser | None = None
        self._client = None
        self._remote: tuple | None = None  # (denoiser, noise model) futures on the cluster
        self._warned: set[str] = set()  # acquisitions already warned about uncalibrated signal
        self.shifts = Shifts() if shifts is None else shifts
        self.turns = turns or ComputeTurns()
        self._next_noise_model: Handover[tuple[NoiseModel, str]] = Handover()  # use_noise_model
        # The end of the warning about signal above the range (the daemon's refiner changes it).
        self.out_of_range_advice = (
            "recalibrate with brighter test-pattern frames for the best denoising"
        )
        self.frame_failures = FrameFailures(self.name, self.log)  # each retried on its own
        self.warm_up_k = warm_up_k if scheduler == "local" else None  # (workers compile their own)
        if scheduler != "local":
            self._client = connect(scheduler)

    def stop(self, timeout: float = 60.0) -> bool:
        """Finish the frames in flight (up to `timeout` seconds), then disconnect from dask."""
        ended = super().stop(timeout)
        if self._client is not None:
            self._client.close()
            self._client = None
        return ended

    def work(self) -> bool:
        self._switch_noise_model()
        self.load_current_model()
        jobs, self.backlog = self._next_jobs()
        BACKLOG.set(self.backlog)
        fresh_waiting = self.backlog > 0 and self._denoiser is not None
        if fresh_waiting:
            self.idle.clear()
        else:
            self.idle.set()
        if jobs and self._denoiser is None and self.warm_up_k:
            self._warm_up(jobs[0])
        if not jobs or self._denoiser is None:
            return False
        self._run(jobs)
        return True

    def _warm_up(self, job: Job) -> None:
        """Once, before the first model: denoise `job`'s frame with an untrained stand-in
        (`frame_denoising.warm_up`), so the first model's frames start at full speed."""
        k, self.warm_up_k = self.warm_up_k, None
        readable, raws, variances = self._read([job])
        if readable:
            seconds = self.turns.run(
                warm_up,
                raws[0],
                self.noise_model,
                k,
                self.device,
                self.tile,
                self.compiled,
                self.bf16,
                variances[0],
            )
            self.log.info("warmed up for the first model in %.1f s", seconds)

    def use_noise_model(self, model: NoiseModel, model_id: str) -> None:
        """Denoise with `model` (a refined noise model) from the next pass on; thread-safe."""
        self._next_noise_model.put((on_device(model, self.device), model_id))

    def _switch_noise_model(self) -> None:
        """Take up a noise model handed over by `use_noise_model` (between passes)."""
        handed = self._next_noise_model.take()
        if handed is None:
            return
        model, model_id = handed
        self.noise_model = model
        self._warned.clear()  # warn again about signal above the new range
        if self._client is not None and self._denoiser is not None:
            self._remote = tuple(
                self._client.scatter([self._denoiser, model], broadcast=True, hash=False)
            )
        self.log.info(
            "now denoising with noise model %s (signal range %.0f–%.0f ADU)",
            model_id,
            *model.signal_range,
        )

    def load_current_model(self) -> None:
        """Load the promoted model if it changed since the last pass."""
        current = self.registry.current()
        if current is None or current == self.model:
            return
        denoiser, info = self.registry.load(current.version)
        denoiser.net.to(self.device)
        self._denoiser, self.model, self.waiting_for_model = denoiser, info, False
        if self._client is not None:
            self._remote = tuple(
                self._client.scatter([denoiser, self.noise_model], broadcast=True, hash=False)
            )
        MODEL_VERSION.set(info.version)
        MODEL_ESTIMATED_GAIN.set(_or_nan(info.estimated_gain_db))
        MODEL_ESTIMATED_GAIN_UNCERTAINTY.set(_or_nan(info.estimated_gain_uncertainty_db))
        self.log.info("now denoising with model version %d (%s)", info.version, info.source)

    def _next_jobs(self) -> tuple[list[Job], int]:
        """Up to `max_in_flight` frames to denoise next, and the number of frames with no twin.

        Only the working set's acquisitions are looked at, in them only frames without a twin
        and the frames of recent acquisitions, so a pass stays cheap however many old
        acquisitions the store holds."""
        acquisitions = sorted(self.working.acquisitions(), key=lambda a: a.closed)  # live first
        fresh = [
            Job(a, t, "new", self._window(a, t))
            for a in acquisitions
            for t in a.frames_without_twin()
            if self._due(a, t)
        ]
        if fresh:
            return fresh[: self.max_in_flight], len(fresh)
        context = self._context
        version = self.model.version if self.model else 1
        recent = [a for a in acquisitions if self.working.recent(a)]
        refine = [
            Job(a, t, "refined", context)
            for a in recent
            if context.after
            for t in a.frames_to_refine(context.after)
            if self._due(a, t)
        ]
        refining = {(job.acquisition.name, job.t) for job in refine}
        stale = [
            Job(a, t, "backfill", self._window(a, t))
            for a in recent
            for t in a.frames_to_denoise(version)
            if self._due(a, t) and (a.name, t) not in refining
        ]
        return (refine + stale)[: self.max_in_flight], 0

    @property
    def context(self) -> str | None:
        """The current model's temporal window "before:after", None before the first model."""
        return str(self._denoiser.context) if self._denoiser else None

    @property
    def _context(self) -> Context:
        return self._denoiser.context if self._denoiser else SPATIAL

    def _window(self, acquisition: Acquisition, t: int) -> Context:
        """The frames around `t` the current model sees now: its whole window once the frames
        after `t` are stored (or the acquisition is closed), else those after `t` hidden."""
        context = self._context
        return context if acquisition.has_later_frames(t, context.after) else context.causal

    def _due(self, acquisition: Acquisition, t: int) -> bool:
        """False while frame `t` waits out its back-off after failing (`FrameFailures`)."""
        return self.frame_failures.due(acquisition.name, t)

    def _run(self, jobs: list[Job]) -> None:
        """Denoise `jobs` as parallel dask tasks, then write each result with the model version;
        a frame that does not read back or does not denoise fails alone (`FrameFailures`)."""
        started = time.monotonic()
        jobs, raws, variances = self._read(jobs)
        if not jobs:
            return
        version = self.model.version
        for job, denoised in zip(jobs, self._denoise(raws, variances), strict=True):
            if isinstance(denoised, BaseException):
                self.frame_failures.failed(job.acquisition.name, job.t, denoised, "denoising")
                continue
            job.acquisition.write_denoised(job.t, denoised, version, job.window)
            self.frame_failures.succeeded(job.acquisition.name, job.t)
            INFERENCE_SECONDS.observe(time.monotonic() - started)
            FRAMES_DENOISED.labels(job.kind).inc()
            if job.kind == "new":
                self._check_calibration(job.acquisition, denoised)
            if self.on_frame is not None:
                self.on_frame(job.acquisition, job.t, denoised, version)
        self.beat()

    def _denoise(
        self, raws: list[np.ndarray], variances: list[np.ndarray | None]
    ) -> list[np.ndarray | Exception]:
        """The denoised frames of `raws` (with their read-noise `variances`), as parallel dask
        tasks, each the frame or the exception that denoising it raised."""
        if self._client is None:
            tasks = [
                dask.delayed(attempt)(
                    denoise_frame,
                    self._denoiser,
                    self.noise_model,
                    raw,
                    self.tile,
                    self.compiled,
                    self.bf16,
                    variance,
                )
                for raw, variance in zip(raws, variances, strict=True)
            ]
            pool = self.turns.executor  # shared turns: the tasks run on their thread, in turn
            return list(dask.compute(*tasks, scheduler="threads", num_workers=len(raws), pool=pool))
        remote_denoiser, remote_noise = self._remote
        futures = [
            self._client.submit(
                attempt,
                denoise_frame,
                remote_denoiser,
                remote_noise,
                raw,
                self.tile,
                self.compiled,
                self.bf16,
                variance,
                key=f"denoise_frame-{uuid.uuid4().hex}",  # named for the task it runs
            )
            for raw, variance in zip(raws, variances, strict=True)
        ]
        return self._client.gather(futures)

    def _read(self, jobs: list[Job]) -> tuple[list[Job], list[np.ndarray], list[np.ndarray | None]]:
        """The jobs whose raw frame reads back, with their registered windows of frames
        equalised with camera maps, and their read-noise variance (None without maps); a damaged
        frame fails alone (counted in pn2v_live_frames_unreadable_total, tried again on its
        back-off: `FrameFailures`), missing from its neighbours' windows (`Stage.read_raw`)."""
        context = self._context
        readable, raws, variances = [], [], []
        for job in jobs:
            try:
                raw = job.acquisition.read_raw(job.t)
            except Exception as error:  # codec or OS error of a damaged chunk
                FRAMES_UNREADABLE.labels(self.name).inc()
                self.frame_failures.failed(job.acquisition.name, job.t, error, "reading")
                continue
            readable.append(job)
            others = (n for n in job.window.frame_numbers(job.t) if n != job.t)
            frames = {job.t: raw, **self.read_stored(job.acquisition, others)}
            inputs = {  # equalised where they were on the sensor, before registration moves them
                n: self.camera.inputs(job.acquisition, frame) for n, frame in frames.items()
            }
            equalised = {n: frame for n, (frame, _) in inputs.items()}
            registration = self.shifts.series(job.acquisition.identity)
            raws.append(window(equalised, job.t, context, job.window, registration))
            variances.append(inputs[job.t][1])
        return readable, raws, variances

    def _check_calibration(self, acquisition: Acquisition, denoised: np.ndarray) -> None:
        """Export the fraction of signal above the calibrated range; warn once per acquisition."""
        fraction = self.noise_model.out_of_range_fraction(torch.from_numpy(denoised))
        SIGNAL_OUT_OF_CALIBRATION.set(fraction)
        if fraction > WARN_FRACTION and acquisition.name not in self._warned:
            self._warned.add(acquisition.name)
            self.log.warning(
                "%.1f %% of the signal lies above the noise model's calibrated maximum %.0f ADU; "
                "%s",
                100 * fraction,
                self.noise_model.signal_range[1],
                self.out_of_range_advice,
                extra={"acquisition": acquisition.name},
            )


def attempt(function: Callable, *args: object) -> object:
    """`function(*args)`, or the exception it raised: a dask task that fails only its frame."""
    try:
        return function(*args)
    except Exception as error:
        return error


def connect(address: str, timeout: float = 5.0):
    """A dask.distributed Client for `address`; UserError when no scheduler answers there."""
    from distributed import Client  # imported here: the local scheduler does not need it

    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise UserError(
            f"inference.scheduler {address}: no dask scheduler answers there ({error}); start "
            'it (dask scheduler) or set inference.scheduler = "local"'
        ) from error


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value
