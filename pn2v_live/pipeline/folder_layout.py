"""How files under a watched folder become frames of acquisitions: which files count (TIFF
suffixes), the pattern that maps a file's path to its acquisition, and the order in which a
folder's files are taken (natural name order: img_2.tif before img_10.tif)."""

from __future__ import annotations

import re

from pn2v_live.errors import UserError

SUFFIXES = (".tif", ".tiff")
DEFAULT_PATTERN = r"(?P<acquisition>[^/]+)/[^/]+"


def natural_key(path: str) -> list:
    """Sort key putting img_2.tif before img_10.tif."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def compile_pattern(pattern: str) -> re.Pattern:
    """The regular expression mapping a file's path (relative to its watched folder, with '/')
    to its acquisition: it must match the whole path and have a group named `acquisition`."""
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise UserError(
            f"acquisition pattern {pattern!r} is not a regular expression: {error}"
        ) from error
    if "acquisition" not in compiled.groupindex:
        raise UserError(
            f"acquisition pattern {pattern!r} needs a group named acquisition, "
            r"e.g. (?P<acquisition>[^/]+)/[^/]+"
        )
    return compiled
