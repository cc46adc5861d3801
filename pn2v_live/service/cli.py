"""The `pn2v-live` command line: one typer app; each module in `commands/` adds its sub-commands."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from pn2v_live.errors import UserError
from pn2v_live.service.native_memory import one_heap

app = typer.Typer(
    name="pn2v-live",
    help="Live Probabilistic Noise2Void denoising beside the microscope.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module registers its commands on `app` when imported.
COMMAND_MODULES = ("algorithm", "bench", "calibrate", "demo", "ingest", "serve")

for _module in COMMAND_MODULES:
    importlib.import_module(f"pn2v_live.service.commands.{_module}")


def main() -> None:
    """Console-script entry point: user mistakes become one line on stderr and exit code 2."""
    one_heap()  # before any command starts a thread (service.native_memory)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        app()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
