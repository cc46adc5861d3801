"""The header check every pn2v-live file shares: its format name and version."""

from __future__ import annotations

from pathlib import Path

from pn2v_live.errors import UserError


def check_format(
    path: Path, header: object, name: str, version: int, what: str, advice: str = ""
) -> dict:
    """`header` (the dict a file starts with) when its "format" is `name` and its "version" is
    `version`; else a UserError saying that `path` is not a pn2v-live `what` file ("noise-model",
    "camera-maps") or of which unsupported version, followed by `advice` (e.g. "; recalibrate")."""
    if not isinstance(header, dict) or header.get("format") != name:
        raise UserError(f"{path}: not a pn2v-live {what} file")
    if header.get("version") != version:
        raise UserError(
            f"{path}: {what} file version {header.get('version')} is not supported "
            f"(this pn2v-live reads version {version}){advice}"
        )
    return header
