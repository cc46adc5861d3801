"""Options that several commands declare alike, declared once so that their names, help and
checks cannot drift apart (each command still gives its own default)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps")]
NoiseModelOutputOption = Annotated[
    Path, typer.Option("-o", "--output", help="noise-model file to write")
]
BinsOption = Annotated[
    int, typer.Option("--bins", min=16, max=4096, help="histogram bins per axis")
]
