"""`pn2v-live send`, `simulate` and `ingest`: getting frames into a store."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated

import typer

from pn2v_live.errors import UserError, writable_folder
from pn2v_live.pipeline.folder_layout import DEFAULT_PATTERN
from pn2v_live.service.cli import app
from pn2v_live.service.stop_request import StopRequest

log = logging.getLogger("pn2v_live.cli")

DEFAULT_TO = "tcp://127.0.0.1:5555"
ToOption = Annotated[str, typer.Option("--to", help="receiver's ZeroMQ frame endpoint")]
StatusOption = Annotated[
    str | None,
    typer.Option("--status", help="receiver's status endpoint", show_default="--to port + 1"),
]


def acquisition_name(name: str | None, fallback: Path | None) -> str:
    """`name`, or one made from `fallback`'s file name ("cells 01.ome.tif" → "cells_01")."""
    from pn2v_live.storage.layout import validate_name

    if name is None:
        stem = fallback.name.split(".")[0] if fallback is not None else "simulated"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "acquisition"
    try:
        return validate_name(name)
    except ValueError as error:
        raise UserError(f"--acquisition: {error}") from error


def _progress(total: int, what: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), transient=False)
    task = progress.add_task(what, total=total)
    return progress, lambda n: progress.advance(task, n)


def _sender(to: str, status: str | None, timeout: float):
    from pn2v_live.wire.sender import FrameSender

    try:
        return FrameSender(to, status, send_timeout=timeout)
    except Exception as error:  # zmq raises ZMQError for malformed endpoints
        raise UserError(f"--to {to}: {error}") from error


def _confirm(sender, acquisition: str, stack, timeout: float, physical=None) -> None:
    """Resend (with `physical`) until the receiver reports every frame stored; UserError when it
    never does."""
    try:
        sender.ensure_stored(acquisition, stack, timeout=timeout, physical=physical)
    except TimeoutError as error:
        raise UserError(
            f"{error} within {timeout:.0f} s; is the receiver running (pn2v-live serve or "
            f"ingest) and listening on {sender.to} with status on {sender.status_address}?"
        ) from error


@app.command()
def send(
    files: Annotated[list[Path], typer.Argument(help="TIFF/PNG images or stacks, in order")],
    to: ToOption = DEFAULT_TO,
    status: StatusOption = None,
    acquisition: Annotated[
        str | None, typer.Option(help="acquisition name", show_default="first file's name")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the receiver")] = 60.0,
) -> None:
    """Send FILES' frames as one acquisition and wait until the receiver has stored them all;
    the first file's pixel size and frame interval (OME-TIFF, ImageJ, resolution tags) go with
    every frame.

    Interrupted or receiver restarted? Run the same command again: only frames the receiver
    lacks are stored, nothing twice.
    """
    import numpy as np

    from pn2v_live.storage.images import read_stack, read_stack_metadata
    from pn2v_live.wire.protocol import ProtocolError

    name = acquisition_name(acquisition, files[0])
    first, metadata = read_stack_metadata(files[0])
    stack = np.concatenate([first, *(read_stack(path) for path in files[1:])])
    physical = metadata.physical
    progress, advance = _progress(len(stack), f"sending {name}")
    with _sender(to, status, timeout) as sender, progress:
        missing = sender.missing(name, len(stack), timeout=min(timeout, 5.0))
        indices = range(len(stack)) if missing is None else missing
        advance(len(stack) - len(indices))
        try:
            for t in indices:
                sender.send_frame(name, t, stack[t], physical=physical)
                advance(1)
        except TimeoutError as error:
            raise UserError(f"{error}; is pn2v-live serve or ingest running there?") from error
        except ProtocolError as error:  # a frame the receiver could not store
            raise UserError(f"{name}: {error}") from error
        _confirm(sender, name, stack, timeout, physical)
        sender.end(name, frames=len(stack), confirm_timeout=timeout)
    typer.echo(f"{name}: all {len(stack)} frames stored by the receiver at {to}")


@app.command()
def simulate(
    to: Annotated[
        str | None, typer.Option("--to", help="send over ZeroMQ to this endpoint")
    ] = None,
    folder: Annotated[
        Path | None, typer.Option("--folder", help="write TIFF files under FOLDER/ACQUISITION/")
    ] = None,
    fps: Annotated[float, typer.Option(help="frames per second", min=0.01)] = 10.0,
    frames: Annotated[int, typer.Option(help="number of frames", min=1)] = 100,
    source: Annotated[
        Path | None,
        typer.Option(help="stack to play (repeated as needed)", show_default="synthetic"),
    ] = None,
    acquisition: Annotated[str | None, typer.Option(help="acquisition name")] = None,
    size: Annotated[int, typer.Option(help="synthetic frame size (pixels)", min=8)] = 256,
    frames_per_file: Annotated[int, typer.Option(help="--folder: frames per TIFF", min=1)] = 1,
    status: StatusOption = None,
) -> None:
    """Play a stack (or synthetic frames) like a microscope: over ZeroMQ or into a folder."""
    from pn2v_live.wire.simulate import movie, play_to_folder, play_to_zmq

    if (to is None) == (folder is None):
        raise UserError("give exactly one of --to tcp://HOST:PORT or --folder DIR")
    name = acquisition_name(acquisition, source)
    stack = movie(frames, source, (size, size))
    progress, advance = _progress(frames, f"{name} at {fps:g} frames/s")
    with progress:
        if folder is not None:
            play_to_folder(stack, folder, name, fps, frames_per_file, progress=advance)
            return
        with _sender(to, status, timeout=30.0) as sender:
            try:
                play_to_zmq(stack, sender, name, fps, progress=advance)
            except TimeoutError as error:
                raise UserError(f"{error}; is pn2v-live serve or ingest running?") from error


@app.command()
def ingest(
    data: Annotated[Path, typer.Option(help="data root: acquisitions and ledger go here")],
    zmq: Annotated[
        str | None, typer.Option("--zmq", help="receive frames on this ZeroMQ endpoint")
    ] = None,
    status: StatusOption = None,
    folder: Annotated[
        list[Path] | None, typer.Option("--folder", help="watch this folder (repeatable)")
    ] = None,
    polling: Annotated[bool, typer.Option(help="poll folders (network shares)")] = False,
    stable_seconds: Annotated[float, typer.Option(help="file unchanged this long = done")] = 2.0,
    pattern: Annotated[
        str,
        typer.Option(help="regex: file path in a watched folder → (?P<acquisition>…)"),
    ] = DEFAULT_PATTERN,
    zarr_format: Annotated[int, typer.Option(help="2 (NGFF 0.4) or 3 (NGFF 0.5)")] = 2,
) -> None:
    """Store frames from ZeroMQ and/or folders, without denoising, until SIGTERM or Ctrl-C."""
    from pn2v_live.pipeline.folder_source import FolderSource
    from pn2v_live.pipeline.zmq_source import ZmqSource
    from pn2v_live.storage.store import Store

    if zmq is None and not folder:
        raise UserError("nothing to ingest: give --zmq tcp://HOST:PORT and/or --folder DIR")
    if zarr_format not in (2, 3):
        raise UserError(f"--zarr-format must be 2 or 3, not {zarr_format}")
    with writable_folder("--data", data):
        store = Store(data, zarr_format, writer=True)
    sources = []
    if zmq is not None:
        sources.append(ZmqSource(store, zmq, status))
    if folder:
        sources.append(FolderSource(store, folder, polling, stable_seconds, pattern=pattern))
    stop = StopRequest()
    stop.install()
    try:
        for started in sources:
            started.start()
        log.info("ingesting into %s; stop with Ctrl-C or SIGTERM", store.root)
        while not stop.wait(None):
            pass
    finally:
        for source in sources:
            source.stop()
        store.close()
        stop.close()
