"""`pn2v-live serve`: run the daemon in the foreground (under systemd, or by hand)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from pn2v_live.errors import UserError
from pn2v_live.service.cli import app
from pn2v_live.service.config import load_config
from pn2v_live.service.daemon import serve as run_daemon

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
QUIET_LIBRARIES = ("distributed", "aiohttp.access", "watchdog", "asyncio")


class _Fields(logging.Filter):
    """Give every record a `component` (last part of the logger name) and an `acquisition`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = record.name.rsplit(".", 1)[-1]
        record.acquisition = getattr(record, "acquisition", "-")
        return True


def configure_logging(level: str) -> None:
    """Structured lines: time, level, component, acquisition, message."""
    handler = logging.StreamHandler()
    handler.addFilter(_Fields())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s level=%(levelname)s component=%(component)s "
            "acquisition=%(acquisition)s %(message)s"
        )
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (see service/pn2v-live.toml)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override one config key, e.g. --set trainer.steps_per_round=50."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the daemon: ingest, store, fine-tune and denoise live until SIGTERM/SIGINT."""
    if log_level.upper() not in LEVELS:
        raise UserError(f"--log-level {log_level!r}: use one of {', '.join(LEVELS).lower()}")
    configure_logging(log_level)
    run_daemon(load_config(config, set_ or []))
