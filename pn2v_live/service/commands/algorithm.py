"""`pn2v-live train`, `denoise` and `evaluate`: the algorithm on files, without the daemon."""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from pn2v_live.core.context import CANDIDATES, Context, Windows
from pn2v_live.errors import UserError
from pn2v_live.service.cli import app
from pn2v_live.service.commands.camera_options import (
    CameraMapsOption,
    SensorOriginOption,
    camera_maps_id,
    camera_series,
    parse_origin,
    sensor_origins,
    warn_if_other_maps,
    with_camera_maps,
)
from pn2v_live.service.commands.options import DeviceOption

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pn2v_live.cli")


class TrainingMode(StrEnum):
    pn2v = "pn2v"
    n2v = "n2v"
    supervised = "supervised"


class OutputDtype(StrEnum):
    float32 = "float32"
    uint16 = "uint16"
    same = "same"


def announce_device(what: str, device: torch.device, bf16: bool | None = None) -> str:
    """Log "`what` on cuda:0 (NVIDIA H200), bfloat16; torch …" and return the description
    (for the command's JSON summary): every command that trains or denoises says where."""
    from pn2v_live.core.device import describe_device, torch_build

    description = describe_device(device, bf16)
    log.info("%s on %s; %s", what, description, torch_build())
    return description


def training_series(
    images: list[Path], gt: list[Path] | None
) -> tuple[list[np.ndarray], list[list[np.ndarray]] | None]:
    """Each of `images` as a float32 (T, Y, X) time series, and with `gt` each one's ground
    truth per frame (one image for all frames of its stack)."""
    from pn2v_live.storage.images import read_image, read_stack

    if gt is not None and len(gt) != len(images):
        raise UserError(
            f"--gt: give one ground-truth image per IMAGE ({len(images)}), not {len(gt)}"
        )
    series = [read_stack(path).astype(np.float32) for path in images]
    if gt is None:
        return series, None
    truths = []
    for path, truth_path, stack in zip(images, gt, series, strict=True):
        truth = read_image(truth_path).astype(np.float32)
        if truth.shape != stack.shape[1:]:
            raise UserError(f"{truth_path}: shape {truth.shape} differs from {path}'s frames")
        truths.append([truth] * len(stack))
    return series, truths


def parse_context(text: str) -> Context | None:
    """ "A:B" → that window; "auto" → None (chosen per acquisition by validation loss)."""
    if text == "auto":
        return None
    try:
        return Context.parse(text)
    except ValueError as error:
        raise UserError(f"--context: {error}, or auto") from None


def warn_if_out_of_calibration(noise_model, frames: list[np.ndarray]) -> None:
    """Log a warning when the data's estimated signal exceeds the calibrated range."""
    from pn2v_live.core.noise import coverage_warning

    for frame in frames[:20]:
        message = coverage_warning(noise_model, frame)
        if message:
            log.warning(message)
            return


@app.command()
def train(
    images: Annotated[list[Path], typer.Argument(help="2-D TIFF/PNG images or multi-page stacks")],
    output: Annotated[Path, typer.Option("-o", "--output", help="model file to write")],
    mode: Annotated[TrainingMode, typer.Option(help="pn2v, n2v or supervised")] = TrainingMode.pn2v,
    noise_model: Annotated[
        Path | None, typer.Option("--noise-model", help="noise-model file (pn2v)")
    ] = None,
    camera_maps: CameraMapsOption = None,
    sensor_origin: SensorOriginOption = None,
    gt: Annotated[
        list[Path] | None, typer.Option(help="ground truth per IMAGE (supervised)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="number of optimiser steps", min=1)] = None,
    minutes: Annotated[float | None, typer.Option(help="wall-time budget", min=0.01)] = None,
    device: DeviceOption = "auto",
    val_fraction: Annotated[
        float, typer.Option(help="frames held back for validation", min=0.0, max=0.9)
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    k: Annotated[int, typer.Option(help="prior samples per pixel (pn2v)", min=1)] = 800,
    batch_size: Annotated[
        int | None,
        typer.Option(help="patches per step", show_default="16 on a GPU, 4 on a CPU", min=1),
    ] = None,
    patch_size: Annotated[int, typer.Option(help="patch side in pixels")] = 96,
    lr: Annotated[float, typer.Option(help="Adam learning rate")] = 4e-4,
    context: Annotated[
        str,
        typer.Option(
            help="frames before:after each frame that the network sees (0:0 single-frame), or "
            "auto: chosen by validation loss among " + ", ".join(map(str, CANDIDATES))
        ),
    ] = "auto",
) -> None:
    """Train a PN2V, N2V or supervised denoiser on IMAGES and write it to OUTPUT."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pn2v_live.core.context_choice import train_choosing_context
    from pn2v_live.core.device import resolve_device
    from pn2v_live.core.model import normalisation_of, seeded_denoisers
    from pn2v_live.core.training import total_steps
    from pn2v_live.core.training import train as train_denoiser
    from pn2v_live.storage.checkpoints import save_denoiser
    from pn2v_live.storage.noise_model_file import load_noise_model
    from pn2v_live.storage.registry import content_id

    if steps is None and minutes is None:
        raise UserError("give --steps N or --minutes M to bound training")
    if (mode is TrainingMode.supervised) != (gt is not None):
        raise UserError("--gt is required with --mode supervised and only allowed with it")
    if mode is TrainingMode.pn2v and noise_model is None:
        raise UserError(
            "--mode pn2v needs --noise-model FILE (make one with `pn2v-live calibrate`)"
        )
    window = parse_context(context)
    device = resolve_device(device)
    series, truths = training_series(images, gt)
    model = load_noise_model(noise_model, device) if noise_model else None
    if model is not None and mode is TrainingMode.pn2v:  # equalised, with a variance channel
        model = with_camera_maps(model, camera_maps)
        series, variances = camera_series(model, series, sensor_origins(sensor_origin, images))
        if variances is not None:
            truths = [[v] * len(s) for v, s in zip(variances, series, strict=True)]
    if model is not None:
        warn_if_out_of_calibration(model, [frame for stack in series for frame in stack][:20])
    mean, std = normalisation_of([frame for stack in series for frame in stack])
    shortest = min(len(stack) for stack in series)
    candidates = [c for c in CANDIDATES if c.channels <= shortest]
    if window is not None and window.channels > shortest:
        raise UserError(f"--context {window} needs {window.channels} frames, not {shortest}")

    description = announce_device("training", device)  # inputs checked: the work starts
    make_denoiser = seeded_denoisers(mode.value, mean, std, k, seed, device)  # same initial weights
    with Progress(
        TextColumn("training"), BarColumn(), TextColumn("{task.description}"), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("", total=steps)

        def report(record: dict) -> None:
            bar.update(
                task,
                completed=record["step"],
                description=f"step {record['step']} val {record['validation_loss']:.4f}",
            )

        options = dict(
            batch_size=batch_size, patch_size=patch_size, lr=lr, val_fraction=val_fraction,
            seed=seed, progress=report,
        )  # fmt: skip
        losses = {}
        try:
            if window is None and len(candidates) > 1:
                denoiser, losses = train_choosing_context(
                    make_denoiser, series, candidates, model, steps, minutes, truths,
                    log=lambda line: bar.console.print(line), **options,
                )  # fmt: skip
                log.info("context %s chosen by validation loss", denoiser.context)
            else:
                denoiser = make_denoiser(window or candidates[0])
                frames = Windows(series, denoiser.context, truths=truths)
                train_denoiser(denoiser, frames, model, steps, minutes, **options)
        except ValueError as error:
            raise UserError(str(error)) from error
    metadata = {
        "images": [str(p) for p in images],
        "noise_model": str(noise_model) if noise_model else None,
        "noise_model_id": content_id(noise_model) if noise_model else None,
        "noise_model_state": model.to("cpu").state() if model else None,
        "camera_maps_id": camera_maps_id(model) if mode is TrainingMode.pn2v else None,
        "context_validation_loss": losses,
    }
    save_denoiser(denoiser, output, metadata)
    last = denoiser.history[-1] if denoiser.history else {}
    summary = {"model": str(output), "mode": mode.value, "context": str(denoiser.context)}
    summary["device"] = description
    print(json.dumps({**summary, **last, "total_steps": total_steps(denoiser.history)}))


def parse_frames(frames: str | None, count: int) -> slice:
    """ "A:B" (Python slice, either end optional) → slice over `count` frames."""
    if frames is None:
        return slice(0, count)
    try:
        start, stop = (int(part) if part else None for part in frames.split(":"))
    except ValueError:
        raise UserError(f"--frames must look like A:B (e.g. 0:5), not {frames!r}") from None
    return slice(*slice(start, stop).indices(count)[:2])


@app.command()
def denoise(
    input: Annotated[Path, typer.Argument(help="2-D image or multi-page stack")],
    model: Annotated[Path, typer.Option("-m", "--model", help="model file from `train`")],
    output: Annotated[Path, typer.Option("-o", "--output", help="OME-TIFF to write")],
    frames: Annotated[str | None, typer.Option(help="frame range A:B")] = None,
    tile: Annotated[
        int | None, typer.Option(help="tile side in pixels (default: auto)", min=16)
    ] = None,
    noise_model: Annotated[
        Path | None, typer.Option("--noise-model", help="override the model's noise model")
    ] = None,
    camera_maps: CameraMapsOption = None,
    sensor_origin: SensorOriginOption = None,
    device: DeviceOption = "auto",
    uncertainty: Annotated[
        Path | None, typer.Option(help="also write the posterior std (pn2v) to this TIFF")
    ] = None,
    causal: Annotated[
        bool,
        typer.Option(
            "--causal",
            help="a model with temporal context sees no frame after the one it denoises (the "
            "daemon's live twin)",
        ),
    ] = False,
    dtype: Annotated[
        OutputDtype,
        typer.Option(
            help="OUTPUT's pixel type; uint16 and same (INPUT's) round and clip, and say how "
            "many pixels were clipped"
        ),
    ] = OutputDtype.float32,
) -> None:
    """Denoise INPUT with MODEL; OUTPUT is an OME-TIFF of INPUT's leading shape carrying INPUT's
    pixel size, frame interval and channel name, and the model and noise model in its
    description.

    A model trained with temporal context sees its window of INPUT's frames around each frame
    (frames outside --frames included)."""
    from rich.progress import track

    from pn2v_live.core.context import window
    from pn2v_live.core.device import resolve_device
    from pn2v_live.core.inference import denoise as denoise_frame
    from pn2v_live.core.noise import noise_model_from_state
    from pn2v_live.storage.checkpoints import load_denoiser
    from pn2v_live.storage.images import cast_clipped, read_stack_metadata, write_tiff
    from pn2v_live.storage.noise_model_file import load_noise_model
    from pn2v_live.storage.tiff_metadata import ome_tiff_options

    stack, image_metadata = read_stack_metadata(input)
    selected = parse_frames(frames, len(stack))
    if selected.start >= selected.stop:
        raise UserError(f"--frames {frames} selects none of the {len(stack)} frames of {input}")
    device = resolve_device(device)
    denoiser, metadata = load_denoiser(model, device)
    noise = None
    if denoiser.mode == "pn2v":
        if noise_model is not None:
            noise = load_noise_model(noise_model, device)
        elif metadata.get("noise_model_state"):
            noise = noise_model_from_state(metadata["noise_model_state"]).to(device)
        else:
            raise UserError(f"{model} carries no noise model: pass --noise-model FILE")
    if uncertainty is not None and denoiser.mode != "pn2v":
        raise UserError("--uncertainty needs a pn2v model")
    if noise is not None:
        noise = with_camera_maps(noise, camera_maps)
        warn_if_other_maps(metadata, noise, model)
    origin = parse_origin(sensor_origin, image_metadata.sensor_origin)
    (inputs,), variances = camera_series(noise, [stack], origin)
    if noise is not None:
        warn_if_out_of_calibration(noise, list(inputs[selected]))
    outputs = ("denoised", "posterior_std") if uncertainty else ("denoised",)
    description = announce_device("denoising", device)  # inputs checked: the work starts
    context = denoiser.context
    visible = context.causal if causal else context
    results = [
        denoise_frame(
            denoiser,
            window(inputs, t, context, visible),
            noise,
            tile,
            outputs,
            read_variance=variances and variances[0],
        )
        for t in track(range(selected.start, selected.stop), description="denoising")
    ]
    count = selected.stop - selected.start
    shape = (count, *stack.shape[1:]) if count > 1 else stack.shape[1:]
    target = stack.dtype if dtype is OutputDtype.same else np.dtype(dtype.value)
    denoised, clipped = cast_clipped(np.stack([r["denoised"] for r in results]), target)
    if target.kind != "f":
        log.info("clipped %d of %d pixels to the %s range", clipped, denoised.size, target.name)
    about = denoised_description(model, metadata, noise_model, denoiser.mode)
    axes = image_metadata.frame_axis + "YX" if count > 1 else "YX"
    channel = image_metadata.channel or ""
    named = f"{channel} denoised".strip()
    write_tiff(
        output, denoised.reshape(shape), ome_tiff_options(image_metadata, axes, named, about)
    )
    if uncertainty:
        std = np.stack([r["posterior_std"] for r in results]).reshape(shape)
        named = f"{channel} posterior std".strip()
        write_tiff(uncertainty, std, ome_tiff_options(image_metadata, axes, named, about))
    summary = {"output": str(output), "frames": len(results), "context": str(context)}
    summary |= {"dtype": target.name, "clipped_pixels": clipped}
    print(json.dumps({**summary, "causal": causal, "device": description}))


def denoised_description(model: Path, metadata: dict, noise_model: Path | None, mode: str) -> str:
    """The OME description of a denoised file: pn2v-live's version, the model's registry version
    (else its file's content id) and the noise model's id."""
    from pn2v_live import __version__
    from pn2v_live.storage.registry import content_id

    version = metadata.get("version") or f"id {content_id(model)}"
    about = f"denoised by pn2v-live {__version__} ({mode}); model {model.name} version {version}"
    if mode != "pn2v":
        return about
    noise_id = content_id(noise_model) if noise_model else metadata.get("noise_model_id")
    return f"{about}; noise model {noise_id or 'embedded, id unknown'}"


@app.command()
def evaluate(
    prediction: Annotated[Path, typer.Argument(help="denoised image or stack")],
    ground_truth: Annotated[Path, typer.Argument(help="ground-truth image (or matching stack)")],
    data_range: Annotated[
        float | None,
        typer.Option(help="PSNR data range", show_default="the ground truth's max - min"),
    ] = None,
) -> None:
    """Print one JSON line with PSNR and PSNR* (means over frames for a stack) and the data range
    they used: --data-range, else the ground truth's max − min (the PN2V paper's convention),
    whatever the bit depth."""
    from pn2v_live.core.metrics import psnr, psnr_star
    from pn2v_live.storage.images import read_stack

    if data_range is not None and not data_range > 0:
        raise UserError(f"--data-range must be > 0, got {data_range}")
    predicted = read_stack(prediction).astype(np.float64)
    truth = read_stack(ground_truth).astype(np.float64)
    if truth.shape[1:] != predicted.shape[1:] or len(truth) not in (1, len(predicted)):
        raise UserError(
            f"{prediction} and {ground_truth} do not match: prediction {len(predicted)} frame(s) "
            f"of {_size(predicted)}, ground truth {len(truth)} frame(s) of {_size(truth)}; give "
            "a ground truth of the prediction's frame size, one image for all frames or one per "
            "frame"
        )
    truth = np.broadcast_to(truth, predicted.shape)
    source = "--data-range"
    if data_range is None:
        data_range, source = float(truth.max() - truth.min()), "ground truth max - min"
        if not data_range > 0:
            raise UserError(f"{ground_truth} is constant: give the PSNR range as --data-range R")
    log.info("PSNR data range %g (%s)", data_range, source)
    pairs = list(zip(predicted, truth, strict=True))
    scores = {
        "psnr": float(np.mean([psnr(p, t, data_range) for p, t in pairs])),
        "psnr_star": float(np.mean([psnr_star(p, t, data_range) for p, t in pairs])),
        "frames": len(predicted),
        "data_range": data_range,
    }
    print(json.dumps(scores))


def _size(stack: np.ndarray) -> str:
    return "x".join(map(str, stack.shape[1:]))  # "512x512" for a (T, Y, X) stack
