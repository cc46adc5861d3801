"""Options that several commands declare alike, declared once so that their names, help and
checks cannot drift apart (each command still gives its own default), and `panel_option` for
the options that only one mode of a command reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
NoiseModelOutputOption = Annotated[
    Path, typer.Option("-o", "--output", help="noise-model file to write")
]
BinsOption = Annotated[
    int, typer.Option("--bins", min=16, max=4096, help="histogram bins per axis")
]


def panel_option(panel: str) -> Callable[..., Any]:
    """`typer.Option(*declarations, help=…, **checks)` for the options that only one mode of a
    command reads: --help lists them under the heading `panel`, so their help need not say it."""

    def option(help: str, *declarations: str, **checks: Any) -> Any:
        return typer.Option(*declarations, help=help, rich_help_panel=panel, **checks)

    return option
