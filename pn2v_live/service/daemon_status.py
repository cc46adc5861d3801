"""What the daemon reports: the liveness of every long-running thread, the status the viewer's
/api/status shows, systemd's STATUS= line, and the per-tick health check that feeds the
watchdog."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence

from pn2v_live.pipeline.inference import InferenceScheduler
from pn2v_live.pipeline.stage import Liveness, thread_liveness
from pn2v_live.pipeline.trainer import Trainer
from pn2v_live.service.notify import SystemdNotifier
from pn2v_live.telemetry import DISK_FULL, STAGE_HEALTHY

log = logging.getLogger("pn2v_live.daemon")


def health_reports(
    parts: Sequence[object], listeners: dict[str, threading.Thread], max_silence: float
) -> list[Liveness]:
    """The liveness of `parts` (those with `health_reports`, silent for at most `max_silence`
    seconds) and of the `listeners` (server threads by name), also exported as
    pn2v_live_stage_healthy{stage} and pn2v_live_disk_full."""
    reports = [
        report
        for part in parts
        if hasattr(part, "health_reports")
        for report in part.health_reports(max_silence)
    ]
    reports += [thread_liveness(name, thread) for name, thread in listeners.items()]
    for report in reports:
        STAGE_HEALTHY.labels(report.name).set(report.healthy)
    DISK_FULL.set(any(disk_full(report) for report in reports))
    return reports


def status_of(
    inference: InferenceScheduler | None,
    trainer: Trainer | None,
    noise_model: dict,
    devices: dict[str, str | None],
    reports: list[Liveness],
) -> dict:
    """What the viewer's /api/status shows, from the inference and trainer stages (None before
    they start), the noise model's status, the devices and the health `reports`."""
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
        "noise_model": noise_model,
        "healthy": all(report.healthy for report in reports),
        "disk_full": any(disk_full(report) for report in reports),
        "health": [report.as_dict() for report in reports],
        "device": devices,
    }


def status_line(status: dict, reports: list[Liveness]) -> str:
    """systemd's STATUS= from a `status_of` dict: what is wrong first (unhealthy threads, a full
    disk, failures being retried), then model, backlog and trainer."""
    model = (
        f"model v{status['model_version']} (context {status['model_context']})"
        if status["model_version"]
        else "waiting for the first model"
    )
    line = (
        f"{model}, backlog {status['backlog']} frames, {status['training_rounds']} rounds, "
        f"trainer {status['trainer_state']}"
    )
    if status["device"]:
        line += f"; inference on {status['device']['inference']}"
    return _health_line(reports) + line


class HealthCheck:
    """The daemon's per-tick check: WATCHDOG=1 only while every thread is healthy, one log line
    when that changes, and STATUS= when it changed."""

    def __init__(self, notifier: SystemdNotifier) -> None:
        self.notifier = notifier
        self._last_status: str | None = None
        self._last_problems: list[tuple[str, str]] = []

    def tick(self, reports: list[Liveness], status: str) -> None:
        """One tick, with the health `reports` and the STATUS= line `status` of now."""
        problems = [report for report in reports if not report.healthy]
        if not problems:
            self.notifier.watchdog()
        key = [(report.name, report.state) for report in problems]
        if key != self._last_problems:
            if problems:
                log.error(
                    "unhealthy, no WATCHDOG=1 until it recovers: %s",
                    "; ".join(str(report) for report in problems),
                )
            else:
                log.info("healthy again: every thread makes progress")
            self._last_problems = key
        if status != self._last_status:
            self.notifier.status(status)
            self._last_status = status


def disk_full(report: Liveness) -> bool:
    """Whether `report` is of a thread paused because the disk is full."""
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
    paused = [r for r in reports if disk_full(r)]
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
