"""A live replay through the real daemon: how soon, and how well, the denoised twins come.

`pn2v-live serve` runs in a subprocess (what users run) on a temporary store with the shipped
defaults plus the user's `--set` overrides; the stack's frames are replayed to it over ZeroMQ by
`FrameSender` at a fixed rate, as one acquisition, and the clock starts at the first frame sent.
For M minutes from then the store is polled: every denoised twin that is new, or was replaced
(a newer model version, or a live twin refined once the later frames arrived), is read and
scored against the ground truth: PSNR of the twin and of its raw frame, and both against the
ground truth brought to the raw frame's brightness (`quality.drift_corrected`). Then the daemon
gets SIGTERM, drains, and the store it leaves is scored once more (the final twins).

The daemon runs as `daemon_process` starts it; the store is read while the daemon writes it
(`store_watch`). A twin whose chunk is replaced between reading the ledger and reading the chunk
can be scored under the previous version for one poll; the next poll reads it again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pn2v_live.errors import UserError
from pn2v_live.service.bench.daemon_process import (
    SEND_TIMEOUT_S,
    Endpoints,
    SenderThread,
    daemon_overrides,
    log_tail,
    sigterm_as_interrupt,
    start_daemon,
    stop_daemon,
    wait_until_ready,
    work_folders,
)
from pn2v_live.service.bench.store_watch import ModelWatcher, Reference, Twin, TwinWatcher

if TYPE_CHECKING:
    from pn2v_live.core.context import Context
    from pn2v_live.service.config import Config
    from pn2v_live.wire.sender import FrameSender

ACQUISITION = "live"
GOOD_GAIN_DB = 3.0  # a twin this much above its raw frame (PSNR) is "good"
SHORTFALL_DB = 1.0  # a final twin this close to the offline one (gain over raw) is "as good"
POLL_SECONDS = 0.5  # store polling period: the resolution of every *_s result

Log = Callable[[str], None]


# ---- inputs ----------------------------------------------------------------------------


def load_inputs(stack_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (T, Y, X) uint8/uint16 stack to replay and its ground truth, float32: one (Y, X)
    image for every frame, or a (T, Y, X) stack with one per frame. UserError when they do not
    fit together."""
    from pn2v_live.storage.images import read_stack

    stack = read_stack(stack_path)
    if stack.dtype not in (np.uint8, np.uint16):
        raise UserError(
            f"--data {stack_path}: frames are {stack.dtype}; the daemon stores camera frames "
            "(uint8 or uint16)"
        )
    truth = read_stack(gt_path).astype(np.float32)
    truth = truth[0] if len(truth) == 1 else truth
    if truth.shape[-2:] != stack.shape[1:]:
        raise UserError(f"--gt {gt_path}: shape {truth.shape[-2:]} differs from the frames' "
                        f"{stack.shape[1:]}")  # fmt: skip
    if truth.ndim == 3 and len(truth) != len(stack):
        raise UserError(
            f"--gt {gt_path}: {len(truth)} frames for a stack of {len(stack)}; give one image "
            "for all frames or one per frame"
        )
    return stack, truth


def data_range(stack: np.ndarray, truth: np.ndarray) -> float:
    """PSNR data range: 255 for 8-bit frames, else the ground truth's max − min."""
    if stack.dtype == np.uint8:
        return 255.0
    return float(truth.max() - truth.min())


def frames_within(count: int, fps: float, minutes: float) -> int:
    """How many of `count` frames, frame n sent n / fps seconds after the first, are sent
    before `minutes` have passed (at least one)."""
    return max(1, min(count, int(np.ceil(minutes * 60 * fps))))


# ---- the replay ------------------------------------------------------------------------


class Replay(SenderThread):
    """Sends `frames` (T, Y, X) with `FrameSender` at `fps` as one acquisition, waits until the
    receiver stored them all, then (with `end`) sends the end marker. `started_at` is the
    monotonic time the first frame was sent; `error` what stopped it early, if anything."""

    def __init__(
        self, endpoints: Endpoints, frames: np.ndarray, fps: float, end: bool, budget_s: float
    ):
        super().__init__("bench-live-replay", endpoints)
        self.frames, self.fps, self.end = frames, fps, end
        self.budget_s = budget_s  # seconds from the first frame to give up waiting for storage
        self.sent_at: float | None = None  # monotonic time the last frame was sent

    def send(self, sender: FrameSender) -> None:
        sender.send_stack(ACQUISITION, self.frames, fps=self.fps)
        self.sent_at = time.monotonic()
        sender.ensure_stored(ACQUISITION, self.frames, timeout=self._left())
        if self.end:
            sender.end(ACQUISITION, len(self.frames), confirm_timeout=self._left())

    def _left(self) -> float:
        return max(5.0, self.started_at + self.budget_s - time.monotonic())


# ---- offline comparison ----------------------------------------------------------------


def offline_gains(
    reference: Reference,
    noise_model_path: Path,
    config: Config,
    context: Context,
    steps: int,
    log: Log,
) -> dict[str, Any]:
    """Train PN2V offline on the replayed frames for `steps` steps with the daemon's settings
    (`config`: its `Config`; `context`: the window its final model chose), denoise every frame
    with the whole window, and return the gains over raw (dB): their means, and per frame
    ("offline_gains_db", in frame order) for the comparison with the daemon's final twins."""
    import torch

    from pn2v_live.core.context import Windows, window
    from pn2v_live.core.device import resolve_device
    from pn2v_live.core.inference import denoise
    from pn2v_live.core.model import PRECISIONS, normalisation_of, seeded_denoisers
    from pn2v_live.core.training import train
    from pn2v_live.storage.noise_model_file import load_noise_model

    t = config.trainer
    device = resolve_device(t.device, "trainer.device")
    noise_model = load_noise_model(noise_model_path, device)
    frames = list(reference.raw.astype(np.float32))
    mean, std = normalisation_of(frames)
    denoiser = seeded_denoisers("pn2v", mean, std, t.k, seed=0, device=device)(context)
    patch = min(t.patch_size, *(side - side % 8 for side in frames[0].shape))
    started = time.monotonic()
    train(
        denoiser, Windows([frames], context), noise_model, steps=steps, batch_size=t.batch_size,
        patch_size=patch, lr=t.learning_rate, bf16=PRECISIONS[t.precision],
        progress=lambda r: log(json.dumps({"offline_step": r["step"],
                                           "validation_loss": r["validation_loss"]})),
    )  # fmt: skip
    gains, corrected = [], []
    bf16 = PRECISIONS[config.inference.precision]
    with torch.inference_mode():
        for n in range(len(frames)):
            denoised = denoise(denoiser, window(frames, n, context), noise_model,
                               tile=config.inference.tile, compiled=config.inference.compile,
                               bf16=bf16)["denoised"]  # fmt: skip
            scores, raw = reference.scores(n, denoised), reference.raw_scores(n)
            gains.append(scores[0] - raw[0])
            corrected.append(scores[1] - raw[1])
    return {
        "offline_gain_db": round(float(np.mean(gains)), 4),
        "offline_gain_drift_corrected_db": round(float(np.mean(corrected)), 4),
        "offline_gains_db": [round(float(gain), 4) for gain in gains],
        "offline_steps": steps,
        "offline_context": str(context),
        "offline_seconds": round(time.monotonic() - started, 1),
    }


# ---- the whole run ---------------------------------------------------------------------


def summarise(twins: list[Twin], final: dict[int, Twin], reference: Reference) -> dict[str, Any]:
    """The result's timing and gain keys from every observation and the final twins."""

    def first(condition: Callable[[Twin], bool]) -> float | None:
        times = [twin.t_s for twin in twins if condition(twin)]
        return round(min(times), 2) if times else None

    def mean(values: list[float]) -> float | None:
        return round(float(np.mean(values)), 4) if values else None

    def lowest(values: list[float]) -> float | None:
        return round(float(min(values)), 4) if values else None

    last = list(final.values())
    raw = [reference.raw_scores(t) for t in range(len(reference.raw))]
    return {
        "first_twin_s": first(lambda twin: True),
        "first_good_twin_s": first(lambda twin: twin.gain_db >= GOOD_GAIN_DB),
        "first_good_twin_drift_corrected_s": first(
            lambda twin: twin.gain_drift_corrected_db >= GOOD_GAIN_DB
        ),
        "min_gain_db": lowest([twin.gain_db for twin in twins]),
        "min_gain_drift_corrected_db": lowest([twin.gain_drift_corrected_db for twin in twins]),
        "final_gain_db": mean([twin.gain_db for twin in last]),
        "final_gain_drift_corrected_db": mean([twin.gain_drift_corrected_db for twin in last]),
        "final_gains_db": [
            None if t not in final else round(final[t].gain_db, 4)
            for t in range(len(reference.raw))
        ],
        "final_psnr_db": mean([twin.psnr_db for twin in last]),
        "raw_psnr_db": mean([score[0] for score in raw]),
        "raw_psnr_drift_corrected_db": mean([score[1] for score in raw]),
        "frames_denoised": len(last),
        "twins_observed": len(twins),
    }


def run_live(
    stack_path: Path,
    gt_path: Path,
    fps: float,
    minutes: float,
    noise_model: Path,
    overrides: list[str],
    offline: bool = False,
    keep: Path | None = None,
    log: Log = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Replay `stack_path` through `pn2v-live serve` at `fps` for `minutes` and score its twins
    against `gt_path` (see the module docstring); with `offline`, also an offline model trained
    for the daemon's steps. Keeps the store and the daemon's log under `keep` (DIR/store,
    DIR/serve.log) when given. Returns the result's keys; progress lines go to `log`."""
    from pn2v_live.service.config import load_config
    from pn2v_live.storage.noise_model_file import load_noise_model

    load_noise_model(noise_model)  # a bad file is the user's: say so before starting anything
    stack, truth = load_inputs(stack_path, gt_path)
    sent = frames_within(len(stack), fps, minutes)
    reference = Reference(stack[:sent], truth[:sent] if truth.ndim == 3 else truth,
                          data_range(stack, truth))  # fmt: skip
    with ExitStack() as cleanup:
        sockets, work = work_folders(cleanup, keep, "pn2v-live-")
        endpoints = Endpoints.in_folder(sockets)
        settings = daemon_overrides(work / "store", noise_model, endpoints, overrides)
        config = load_config(None, settings)  # UserError for a bad --set, before starting
        cleanup.enter_context(sigterm_as_interrupt())
        result = _replay_and_watch(reference, config, settings, endpoints, work, fps, minutes,
                                   end=sent == len(stack), log=log)  # fmt: skip
        if offline:
            result |= _offline(reference, noise_model, config, result, log)
    return {
        **result,
        "frames": sent,
        "fps": fps,
        "minutes": minutes,
        "size": list(stack.shape[1:]),
        "dtype": str(stack.dtype),
        "data_range": reference.data_range,
        "acquisition": ACQUISITION,
        "store": str(work / "store") if keep is not None else None,
    }


def _replay_and_watch(
    reference: Reference,
    config: Config,
    settings: list[str],
    endpoints: Endpoints,
    work: Path,
    fps: float,
    minutes: float,
    end: bool,
    log: Log,
) -> dict[str, Any]:
    """Start the daemon, replay, poll for `minutes` from the first frame, stop it, score the
    store it leaves; the result's daemon, timing and gain keys."""
    from pn2v_live.core.device import resolve_device
    from pn2v_live.service.bench.daemon_metrics import metrics_url
    from pn2v_live.service.bench.measure import device_facts
    from pn2v_live.service.bench.pace import Pace

    log_path = work / "serve.log"
    process = start_daemon(settings, log_path)
    try:
        wait_until_ready(process, endpoints, log_path)
        pace = Pace(metrics_url(log_path))
        twins = TwinWatcher(config.store.root, reference, ACQUISITION)
        models = ModelWatcher(config.store.root / "models")
        replay = Replay(endpoints, reference.raw, fps, end, budget_s=minutes * 60)
        replay.start()
        replay.started.wait()
        started = replay.started_at or time.monotonic()
        log(json.dumps({"t_s": 0.0, "event": "first frame sent", "frames": len(reference.raw),
                        "fps": fps, "daemon_log": str(log_path)}))  # fmt: skip
        observed: list[Twin] = []
        failures: list[BaseException] = []
        denoised_all: list[float] = []  # when every frame sent first had a twin

        def poll() -> None:
            now = time.monotonic() - started
            if replay.error is not None and not replay.is_alive() and not failures:
                failures.append(replay.error)  # the run goes on with the frames that left
                log(json.dumps({"t_s": round(now, 2), "replay_error":
                                f"{type(replay.error).__name__}: {replay.error}"}))  # fmt: skip
            if (version := models.poll()) is not None:
                info = models.infos[version]
                log(json.dumps({"t_s": round(now, 2), "promoted": version,
                                "training_steps": models.training_steps(version),
                                "estimated_gain_db": info.get("estimated_gain_db")}))  # fmt: skip
            for twin in twins.poll(now):
                observed.append(twin)
                log(json.dumps(twin.line()))
            if not denoised_all and len(twins.latest) == len(reference.raw):
                denoised_all.append(round(now, 2))
            if process.poll() is None:  # after the stop, the store alone is read
                pace.take(now)

        deadline = started + minutes * 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise UserError(f"the daemon exited with code {process.returncode} during the "
                                f"replay:\n{log_tail(log_path)}")  # fmt: skip
            poll()
            time.sleep(max(0.0, min(POLL_SECONDS, deadline - time.monotonic())))
        replay.join(SEND_TIMEOUT_S)
        exit_code = stop_daemon(process)
        poll()  # what the drain finished, and the store as the daemon left it
        stored = twins.frames_stored()
        twins.close()
    finally:
        stop_daemon(process)
    version = models.current
    trainer_device = resolve_device(config.trainer.device, "trainer.device")
    sent_s = None if replay.sent_at is None else replay.sent_at - started
    return {
        **summarise(observed, twins.latest, reference),
        **pace.summary(sent_s, denoised_all[0] if denoised_all else None),
        "frames_stored": stored,
        "model_version": version,
        "training_steps": None if version is None else models.training_steps(version),
        "model_estimated_gain_db": (
            None if version is None else models.infos[version].get("estimated_gain_db")
        ),
        "daemon_exit_code": exit_code,
        **device_facts(trainer_device),
        "inference_device": resolve_device(config.inference.device, "inference.device").type,
        "k": config.trainer.k,
    }


def _offline(
    reference: Reference,
    noise_model: Path,
    config: Config,
    result: dict[str, Any],
    log: Log,
) -> dict[str, Any]:
    """`offline_gains` for the daemon's final model's steps and window, and per frame how far
    the daemon's final twin falls short of the offline one (`shortfalls`); nulls (with a reason)
    when the daemon promoted no trained model."""
    from pn2v_live.storage.registry import ModelRegistry

    version, steps = result["model_version"], result["training_steps"]
    if version is None or not steps:
        log(json.dumps({"offline": "skipped: the daemon promoted no trained model"}))
        return {"offline_gain_db": None, "offline_gain_drift_corrected_db": None}
    denoiser, _ = ModelRegistry(config.store.root / "models").load(version)  # daemon stopped
    offline = offline_gains(reference, noise_model, config, denoiser.context, steps, log)
    return offline | shortfalls(result["final_gains_db"], offline["offline_gains_db"])


def shortfalls(final: list[float | None], offline: list[float]) -> dict[str, Any]:
    """How far each frame's final twin falls short of its offline twin, in dB of gain over raw
    (positive: the live result is worse; a frame without a twin falls short by its whole offline
    gain): the largest shortfall, and how many frames are within SHORTFALL_DB."""
    short = [
        off - (0.0 if live is None else live) for live, off in zip(final, offline, strict=True)
    ]
    return {
        "offline_shortfall_max_db": round(max(short), 4),
        "frames_within_1db_of_offline": sum(gap <= SHORTFALL_DB for gap in short),
    }
