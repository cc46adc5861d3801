"""`pn2v-live calibrate` (the checked workflow) and `pn2v-live fit-noise-model` (the bare fit)."""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pn2v_live.errors import UserError
from pn2v_live.service.cli import app

log = logging.getLogger("pn2v_live.cli")


class CalibrationKind(StrEnum):
    hybrid = "hybrid"
    histogram = "histogram"
    gmm = "gmm"
    poisson_gaussian = "poisson-gaussian"
    all = "all"


class FitKind(StrEnum):
    hybrid = "hybrid"
    histogram = "histogram"
    gmm = "gmm"
    poisson_gaussian = "poisson-gaussian"


@app.command()
def calibrate(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="static-scene acquisitions: TIFF/OME-TIFF stacks, folders of frames, or "
            "<name>.ome.zarr acquisitions of the store"
        ),
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="noise-model file to write")],
    signal: Annotated[
        Path | None, typer.Option(help="clean image of the scene [default: mean of the frames]")
    ] = None,
    kind: Annotated[
        CalibrationKind,
        typer.Option(help="model to fit; all = fit every kind, keep the best held-out NLL"),
    ] = CalibrationKind.hybrid,
    bins: Annotated[int, typer.Option(min=16, max=4096, help="histogram bins per axis")] = 256,
    report: Annotated[Path | None, typer.Option(help="report figure to write (PNG)")] = None,
    camera: Annotated[str, typer.Option(help="camera / setting name stored with the model")] = "",
    offset: Annotated[
        float | None,
        typer.Option(help="camera black level (ADU) [default: level of the darkest pixels]"),
    ] = None,
    bootstrap: Annotated[
        bool, typer.Option(help="no test pattern: use N2V predictions of the images as signal")
    ] = False,
    steps: Annotated[int | None, typer.Option(min=1, help="bootstrap: N2V training steps")] = None,
    minutes: Annotated[
        float | None, typer.Option(min=0.01, help="bootstrap: N2V training wall time")
    ] = None,
) -> None:
    """Fit noise models from a calibration acquisition, compare them on held-out frames and write
    the best; prints a one-line JSON summary."""
    from pn2v_live.core.device import torch_build
    from pn2v_live.pipeline.calibration import (
        bootstrap_signal,
        read_acquisition,
        write_outputs,
    )
    from pn2v_live.pipeline.calibration import (
        calibrate as run_calibration,
    )
    from pn2v_live.storage.images import read_image

    if bootstrap and signal is not None:
        raise UserError("--bootstrap estimates the signal itself; drop --signal (or --bootstrap)")
    if not bootstrap and (steps or minutes):
        raise UserError("--steps/--minutes apply to --bootstrap only")
    if report is not None and report.suffix.lower() != ".png":
        raise UserError(f"--report {report}: the report is a PNG image; name it *.png")
    acquisitions = [read_acquisition(path) for path in inputs]
    clean = read_image(signal) if signal is not None else None
    signals = None
    device = calibration_device(bootstrap)
    if bootstrap:
        if steps is None and minutes is None:
            steps = 400
        log.info("bootstrap N2V training on %s; %s", device, torch_build())
        signals = bootstrap_signal(acquisitions, steps, minutes)
    result = run_calibration(
        acquisitions,
        kind=kind.value,
        bins=bins,
        camera=camera,
        signal=clean,
        offset=offset,
        bootstrap_signals=signals,
    )
    if not bootstrap:  # after the checks, as the bootstrap's line comes before its training
        log.info("noise models fitted on %s; %s", device, torch_build())
    summary = write_outputs(result, output, report, everything=kind == CalibrationKind.all)
    print(json.dumps({**summary, "device": device}))


def calibration_device(bootstrap: bool) -> str:
    """Where calibration runs: always the CPU (the fits are small), with the precision of the
    U-Net body when `bootstrap` trains an N2V network there too."""
    import torch

    from pn2v_live.core.device import describe_device, device_name

    cpu = torch.device("cpu")
    return describe_device(cpu) if bootstrap else device_name(cpu)


@app.command("fit-noise-model")
def fit_noise_model(
    signal: Annotated[Path, typer.Option(help="clean image (Y, X) or stack matching STACK")],
    observations: Annotated[Path, typer.Option(help="noisy frames of the same scene")],
    output: Annotated[Path, typer.Option("-o", "--output", help="noise-model file to write")],
    kind: Annotated[FitKind, typer.Option(help="model to fit")] = FitKind.histogram,
    bins: Annotated[int, typer.Option(min=16, max=4096, help="histogram bins per axis")] = 256,
) -> None:
    """Fit one noise model to all (signal, observation) pairs, without checks or held-out frames;
    prints a one-line JSON summary. `calibrate` is the checked workflow."""
    from pn2v_live.core.noise import as_pairs
    from pn2v_live.pipeline.calibration import fit_models
    from pn2v_live.storage.images import read_stack
    from pn2v_live.storage.noise_model_file import save_noise_model

    clean = read_stack(signal)
    frames = read_stack(observations)
    clean = clean[0] if len(clean) == 1 else clean
    if clean.shape not in (frames.shape, frames.shape[1:]):
        raise UserError(
            f"--signal shape {clean.shape} matches neither the frames {frames.shape[1:]} nor the "
            f"stack {frames.shape}"
        )
    pairs = as_pairs(clean, frames)
    model = fit_models((kind.value,), *pairs, bins)[kind.value]
    model.metadata.update(inputs=[str(signal), str(observations)], pairs=int(pairs[0].numel()))
    save_noise_model(model, output)
    summary = {"output": str(output), "kind": model.kind, "signal_range": model.signal_range}
    summary["nll"] = round(model.nll(*pairs), 5)
    print(json.dumps(summary))
