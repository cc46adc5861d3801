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
from pn2v_live.service.commands.options import BinsOption, NoiseModelOutputOption, panel_option

log = logging.getLogger("pn2v_live.cli")
bootstrap_option = panel_option("--bootstrap")
scmos_option = panel_option("sCMOS camera maps")


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
    output: NoiseModelOutputOption,
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(
            help="static-scene acquisitions: TIFF/OME-TIFF stacks, folders of frames, or "
            "<name>.ome.zarr acquisitions of the store (optional with sCMOS camera maps)"
        ),
    ] = None,
    signal: Annotated[
        Path | None,
        typer.Option(help="clean image of the scene", show_default="mean of the frames"),
    ] = None,
    kind: Annotated[
        CalibrationKind,
        typer.Option(help="model to fit; all = fit every kind, keep the best held-out NLL"),
    ] = CalibrationKind.hybrid,
    bins: BinsOption = 256,
    report: Annotated[Path | None, typer.Option(help="report figure to write (PNG)")] = None,
    camera: Annotated[str, typer.Option(help="camera / setting name stored with the model")] = "",
    offset: Annotated[
        float | None,
        typer.Option(help="camera black level (ADU)", show_default="level of the darkest pixels"),
    ] = None,
    bootstrap: Annotated[
        bool, bootstrap_option("no test pattern: use N2V predictions of the images as signal")
    ] = False,
    steps: Annotated[
        int | None,
        bootstrap_option("N2V training steps", min=1, show_default="400, none with --minutes"),
    ] = None,
    minutes: Annotated[float | None, bootstrap_option("N2V training wall time", min=0.01)] = None,
    dark: Annotated[
        Path | None, scmos_option("dark series (camera capped): offset, variance")
    ] = None,
    flat: Annotated[
        list[Path] | None,
        scmos_option("flat-field series, one per light level (repeat), for the gain"),
    ] = None,
    offset_map: Annotated[Path | None, scmos_option("offset map TIFF (ADU)")] = None,
    gain_map: Annotated[Path | None, scmos_option("gain map TIFF (ADU/e⁻)")] = None,
    variance_map: Annotated[
        Path | None, scmos_option("read-noise variance map TIFF (ADU²)")
    ] = None,
    maps_output: Annotated[
        Path | None,
        scmos_option("camera-maps file to write", show_default="OUTPUT stem + .camera.tif"),
    ] = None,
) -> None:
    """Fit noise models from a calibration acquisition, compare them on held-out frames and write
    the best; prints a one-line JSON summary.

    sCMOS cameras: with --dark and --flat (or --offset-map and --gain-map) the per-pixel camera
    maps are calibrated too, written beside OUTPUT and stored in it; INPUTS are then equalised
    with the maps before the noise model is fitted (without INPUTS, the maps' Poisson–Gaussian
    model is used)."""
    from pn2v_live.calibration.workflow import (
        bootstrap_signal,
        read_acquisition,
        write_outputs,
    )
    from pn2v_live.calibration.workflow import (
        calibrate as run_calibration,
    )
    from pn2v_live.core.device import torch_build
    from pn2v_live.storage.images import read_image

    if bootstrap and signal is not None:
        raise UserError("--bootstrap estimates the signal itself; drop --signal (or --bootstrap)")
    if not bootstrap and (steps or minutes):
        raise UserError("--steps/--minutes apply to --bootstrap only")
    if report is not None and report.suffix.lower() != ".png":
        raise UserError(f"--report {report}: the report is a PNG image; name it *.png")
    maps = camera_maps(dark, flat, offset_map, gain_map, variance_map, camera)
    if maps is None and not inputs:
        raise UserError(
            "give static-scene INPUTS to calibrate on, or sCMOS maps: --dark DARK --flat FLAT..., "
            "or --offset-map and --gain-map"
        )
    if maps is not None:
        output_maps = maps_output or output.with_name(f"{output.stem}.camera.tif")
        summary = calibrate_with_maps(maps, inputs or [], output, output_maps, report, kind, bins)
        print(json.dumps({**summary, "device": calibration_device(False)}))
        return
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


def camera_maps(
    dark: Path | None,
    flats: list[Path] | None,
    offset_map: Path | None,
    gain_map: Path | None,
    variance_map: Path | None,
    camera: str,
):
    """The sCMOS maps the options ask for (calibrated, or read from map files), or None."""
    from pn2v_live.calibration.camera_maps import calibrate_camera, maps_from_arrays
    from pn2v_live.calibration.workflow import read_acquisition
    from pn2v_live.storage.images import read_image

    from_series, from_files = dark or flats, offset_map or gain_map or variance_map
    if from_series and from_files:
        raise UserError("give --dark/--flat or map files (--offset-map ...), not both")
    if from_series:
        if dark is None or not flats:
            raise UserError("calibrating camera maps needs --dark DARK and --flat FLAT (repeated)")
        return calibrate_camera(
            read_acquisition(dark), [read_acquisition(path) for path in flats], camera
        ).maps
    if from_files:
        if offset_map is None or gain_map is None:
            raise UserError("map files: give at least --offset-map and --gain-map")
        warnings: list[str] = []
        variance = read_image(variance_map) if variance_map else None
        maps = maps_from_arrays(read_image(offset_map), read_image(gain_map), variance, warnings)
        for message in warnings:
            log.warning(message)
        maps.metadata.update(camera=camera, warnings=warnings)
        return maps
    return None


def calibrate_with_maps(maps, inputs, output, maps_output, report, kind, bins) -> dict:
    """Write the maps, and the noise model made per-pixel by them: fitted on the INPUTS
    equalised (their raw values checked against the maps first), else the maps' own
    Poisson–Gaussian model; returns the JSON summary."""
    from pn2v_live.calibration.camera_maps import fit_check, refuse_clipped
    from pn2v_live.calibration.workflow import Acquisition, read_acquisition
    from pn2v_live.calibration.workflow import calibrate as run_calibration
    from pn2v_live.core.noise import CameraNoiseModel
    from pn2v_live.storage.camera_maps_file import save_camera_maps
    from pn2v_live.storage.noise_model_file import save_noise_model

    summary = {"camera_maps": str(maps_output), "maps": dict(maps.metadata)}
    if inputs:
        raws = [read_acquisition(path) for path in inputs]
        try:
            regions = [maps.region(maps.origin, a.frames.shape[1:]) for a in raws]
        except ValueError as error:
            raise UserError(f"camera maps: {error}") from None
        for acquisition in raws:
            refuse_clipped(acquisition)  # equalised frames are float: check the camera's values
        equalised = [
            Acquisition(a.name, r.equalise(a.frames)) for a, r in zip(raws, regions, strict=True)
        ]
        result = run_calibration(equalised, kind=kind.value, bins=bins)
        fitted = result.poisson_gaussian
        checks = {
            a.name: fit_check(r, a.frames, a.name, fitted.gain, fitted.read_noise**2)
            for a, r in zip(raws, regions, strict=True)
        }
        # Kept with the maps written (the regions checked are copies of them).
        maps.metadata["fit_check"] = {
            a.name: r.metadata["fit_check"] for a, r in zip(raws, regions, strict=True)
        }
        misfits = [m for r in regions for m in r.metadata["fit_check"]["warnings"]]
        base = result.models[result.chosen]
        summary |= {**result.summary, "fit_check": checks, "warnings": result.warnings + misfits}
        if report is not None:
            from pn2v_live.calibration.report import write_report

            write_report(result, report)
    else:
        if maps.metadata.get("source") == "map files":
            log.warning(
                "map files without INPUTS: nothing to check them against; give raw frames of "
                "this camera setting as INPUTS to check that the maps fit them"
            )
        offset, gain = maps.reference
        top = max(maps.metadata.get("levels_electrons") or [1000.0])
        model = CameraNoiseModel.from_maps(maps, (offset, offset + gain * top))
        base = model.base
        summary["chosen"] = base.kind
    if report is not None:
        from pn2v_live.calibration.report import write_maps_report

        summary["maps_report"] = str(write_maps_report(maps, report))
    save_camera_maps(maps, maps_output)
    noise_model = CameraNoiseModel(base, maps, dict(base.metadata, camera_maps=str(maps_output)))
    save_noise_model(noise_model, output)
    return {**summary, "output": str(output), "kind": noise_model.kind}


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
    output: NoiseModelOutputOption,
    kind: Annotated[FitKind, typer.Option(help="model to fit")] = FitKind.histogram,
    bins: BinsOption = 256,
) -> None:
    """Fit one noise model to all (signal, observation) pairs, without checks or held-out frames;
    prints a one-line JSON summary. `calibrate` is the checked workflow."""
    from pn2v_live.core.calibration import fit_models
    from pn2v_live.core.noise import as_pairs
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
