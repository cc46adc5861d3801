"""`pn2v-live bench`: timings and peak memory as one JSON line per part."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pn2v_live.errors import UserError
from pn2v_live.service.cli import app
from pn2v_live.service.commands.options import DeviceOption, panel_option

if TYPE_CHECKING:
    from pn2v_live.service.bench.quality import QualitySettings


class Part(StrEnum):
    predict = "predict"
    train = "train"
    ingest = "ingest"
    pipeline = "pipeline"
    quality = "quality"
    live = "live"
    soak = "soak"


quality_option = panel_option("--part quality")
live_option = panel_option("--part live, soak")


@app.command()
def bench(
    part: Annotated[list[Part], typer.Option(help="what to measure (repeatable)")] = [  # noqa: B006
        Part.predict
    ],
    size: Annotated[
        int | None,
        typer.Option(
            help="frame side, or patch side (train)",
            show_default="predict, ingest: 512; pipeline, soak: 256; train: 100",
        ),
    ] = None,
    k: Annotated[int, typer.Option(help="prior samples per pixel")] = 800,
    device: DeviceOption = "auto",
    repeats: Annotated[int, typer.Option(help="timed repeats after one warm-up")] = 3,
    baseline: Annotated[
        str | None, typer.Option(help="'naive': also time the straightforward formulation")
    ] = None,
    frames: Annotated[int, typer.Option(help="frames to stream (ingest, pipeline)")] = 500,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="quality: training budget per model, wall-clock; live: how long the daemon runs "
            "from the first frame sent (required); soak: how long frames stream",
            show_default="quality: 20, none with --steps; soak: 10",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="quality: folder holding fmd_confocal_bpae/; live: the stack to replay (TIFF "
            "stack or folder of frames, uint8/uint16)",
            envvar="PN2V_LIVE_TEST_DATA",
        ),
    ] = None,
    context: Annotated[
        list[str],
        typer.Option(
            help="quality: train PN2V with each of these temporal contexts (repeatable): A:B "
            "frames before:after, or auto; predict: also time a model with the first A:B other "
            "than 0:0 (context_cost_ratio)"
        ),
    ] = ["0:0"],  # noqa: B006
    steps: Annotated[int | None, quality_option("stop each model after this many steps")] = None,
    seeds: Annotated[
        int, quality_option("train every model with seeds 0..N-1, report the mean", min=1)
    ] = 1,
    noise_model: Annotated[
        list[str],
        quality_option(
            "train PN2V with each of these noise-model kinds (repeatable): histogram, hybrid, "
            "gmm, poisson-gaussian"
        ),
    ] = ["histogram", "hybrid"],  # noqa: B006
    score_frames: Annotated[
        int, quality_option("score the target's first N frames", min=1, max=50)
    ] = 5,
    score_spread: Annotated[
        bool,
        quality_option(
            "score the N frames spread evenly over the acquisition instead", "--score-spread"
        ),
    ] = False,
    drift: Annotated[int, quality_option("the target drifts by PX pixels per frame", min=0)] = 0,
    target: Annotated[
        str, quality_option("field of view scored (fov03 or fov04 are held out)")
    ] = "fov03",
    mode: Annotated[
        list[str], quality_option("models to train (repeatable): n2v, pn2v, supervised")
    ] = ["n2v", "pn2v", "supervised"],  # noqa: B006
    gt: Annotated[
        Path | None, live_option("live: ground truth, one image per frame or a stack of one each")
    ] = None,
    fps: Annotated[
        float | None,
        live_option(
            "frames per second of the replay (live) or of the stream (soak)",
            min=0.001,
            show_default="soak: 2",
        ),
    ] = None,
    noise_model_file: Annotated[
        Path | None,
        live_option(
            "live: the daemon's noise-model file (make one with pn2v-live calibrate); soak: "
            "instead of the synthetic camera's own"
        ),
    ] = None,
    offline: Annotated[
        bool,
        live_option(
            "live: also train offline on the replayed frames for the daemon's total steps, with "
            "its settings and window, and report that model's gain (offline_gain_db)",
            "--offline",
        ),
    ] = False,
    set_: Annotated[
        list[str] | None,
        live_option(
            "override one daemon config key (repeatable), e.g. --set trainer.device=cuda; the "
            "shipped defaults otherwise",
            "--set",
        ),
    ] = None,
    keep: Annotated[
        Path | None,
        live_option(
            "keep the daemon's store (DIR/store) and log (DIR/serve.log; soak also "
            "DIR/samples.jsonl) in DIR",
            show_default="a temporary folder, removed",
        ),
    ] = None,
) -> None:
    """Measure PARTs; each prints one JSON line (median/min seconds, throughput, peak memory,
    device, torch threads, dtype; with --baseline naive also the ratio to the naive formulation).
    `quality` trains N2V, PN2V (with each --noise-model kind, fitted on fov01 + fov02) and
    supervised on the shared FMD confocal data, each for the same budget, and reports the PSNR
    (dB) of fov03's first --score-frames frames (5) against its ground truth, and against the
    ground truth brought to each frame's brightness (the scene drifts during the acquisition).
    PN2V is trained once per --noise-model kind and --context; with --drift PX the target is
    cropped by a window sliding PX pixels per frame (real camera noise, moving scene).
    `live` runs the real daemon (`pn2v-live serve`, shipped defaults plus --set) on a temporary
    store, replays --data to it over ZeroMQ at --fps for --minutes, and reports how soon and how
    much the denoised twins beat the raw frames against --gt (one JSON line per twin seen on
    stderr). `soak` streams synthetic --size² camera frames through the real daemon (training
    on) at --fps (2) for --minutes (10), a new acquisition per minute, sampling its RSS, open
    files, threads, inference backlog and receive-queue bytes every second; it reports start,
    end and max of each, and the RSS slope (MB/h) and growth (%) after the first minute."""
    import torch

    from pn2v_live.core.context import SPATIAL
    from pn2v_live.core.device import resolve_device
    from pn2v_live.service.bench.algorithm import bench_predict, bench_train
    from pn2v_live.service.bench.measure import device_facts
    from pn2v_live.service.commands.algorithm import parse_context

    if baseline not in (None, "naive"):
        raise UserError(f"--baseline must be 'naive', not {baseline!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    torch_device = resolve_device(device)
    contexts = tuple(parse_context(text) for text in context)
    facts = {**device_facts(torch_device), "dtype": "float32"}
    for name in part:
        if name is Part.predict:
            side = size or 512
            temporal = [c for c in contexts if c not in (None, SPATIAL)]
            result = bench_predict(
                side, k, torch_device, repeats, baseline, temporal[0] if temporal else SPATIAL
            )
        elif name is Part.train:
            side = size or 100
            result = bench_train(side, k, torch_device, repeats, baseline)
        elif name is Part.ingest:
            from pn2v_live.service.bench.ingest import run_ingest

            side = size or 512
            result = run_ingest(side, frames)
        elif name is Part.live:
            side = None  # the result says the frame shape
            result = run_live_part(data, gt, fps, minutes, noise_model_file, set_ or [],
                                   offline, keep)  # fmt: skip
        elif name is Part.soak:
            from pn2v_live.service.bench.soak import run_soak

            side = size or 256
            result = run_soak(10.0 if minutes is None else minutes, fps or 2.0, side,
                              set_ or [], noise_model_file, keep)  # fmt: skip
        elif name is Part.quality:
            from pn2v_live.service.bench.quality import QualitySettings

            side = 512
            if minutes is None and steps is None:
                # With --steps the step budget is the only one: on a busy machine a minutes
                # budget would cut it short.
                minutes = 20.0
            settings = QualitySettings(
                target=target, modes=tuple(mode), minutes=minutes, steps=steps, k=k,
                score_frames=score_frames, score_spread=score_spread, contexts=contexts,
                drift=drift,
            )  # fmt: skip
            result = run_quality(data, settings, seeds, tuple(noise_model))
        else:
            from pn2v_live.service.bench.pipeline import run_pipeline

            side = size or 256
            result = run_pipeline(side, frames, k, torch_device)
        print(json.dumps({"part": name.value, "size": side, "k": k, **facts, **result}), flush=True)


def run_live_part(
    data: Path | None,
    gt: Path | None,
    fps: float | None,
    minutes: float | None,
    noise_model_file: Path | None,
    overrides: list[str],
    offline: bool,
    keep: Path | None,
) -> dict:
    """`bench --part live` (see `service.bench.live`), once its required options are there."""
    from pn2v_live.service.bench.live import run_live

    required = {
        "--data STACK": data,
        "--gt IMAGE": gt,
        "--fps F": fps,
        "--minutes M": minutes,
        "--noise-model-file FILE": noise_model_file,
    }
    missing = [option for option, value in required.items() if value is None]
    if missing:
        raise UserError(f"--part live needs {', '.join(missing)}")
    return run_live(data, gt, fps, minutes, noise_model_file, overrides, offline, keep)


def run_quality(
    data: Path | None, settings: QualitySettings, seeds: int, kinds: tuple[str, ...]
) -> dict:
    """PSNR of raw and of every trained model on the target of `settings` (see `bench`), PN2V
    once per noise-model kind in `kinds` and context, with the budget used: the mean over
    `seeds` runs, and each run's score under "<score>_by_seed"."""
    import numpy as np
    import torch

    from pn2v_live.calibration.workflow import KINDS
    from pn2v_live.core.model import MODES
    from pn2v_live.service.bench.algorithm import body_dtype
    from pn2v_live.service.bench.quality import (
        FIELD_FRAMES,
        FIELDS,
        FMD,
        calibrated_models,
        compare,
        scored_frames,
    )

    if data is None or not (data / FMD).is_dir():
        raise UserError(f"--data must name a folder holding {FMD}/ (got {data})")
    if unknown := sorted(set(kinds) - set(KINDS)):
        raise UserError(f"--noise-model must be one of {', '.join(KINDS)}, not {unknown[0]!r}")
    if unknown := sorted(set(settings.modes) - set(MODES)):
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not {unknown[0]!r}")
    if settings.target not in FIELDS:
        raise UserError(f"--target must be one of {', '.join(FIELDS)}, not {settings.target!r}")
    models = calibrated_models(data, kinds=kinds)
    runs = [
        compare(
            data, models, settings, seed, log=lambda line: print(line, file=sys.stderr, flush=True)
        )
        for seed in range(seeds)
    ]
    summary: dict = {}
    for score in runs[0]:
        by_seed = {name: [run[score][name] for run in runs] for name in runs[0][score]}
        summary[score] = {name: float(np.mean(values)) for name, values in by_seed.items()}
        summary[f"{score}_by_seed"] = by_seed
    body = body_dtype(torch.device("cpu"))  # compare() trains on the CPU
    return {
        **summary,
        "seeds": seeds,
        "minutes_per_model": settings.minutes,
        "steps_per_model": settings.steps,
        "scored_frames": scored_frames(FIELD_FRAMES, settings.score_frames, settings.score_spread),
        "target": settings.target,
        "drift_px_per_frame": settings.drift,
        "body_dtype": body,
    }
