"""The one exception type for user mistakes: the CLI prints its message without a traceback."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, bad input file); the message says how."""


@contextmanager
def writable_folder(setting: str, folder: Path) -> Iterator[None]:
    """Turn an OSError or sqlite3.Error raised inside into a UserError saying that `folder`
    (given by `setting`, e.g. "store.root" or "--data") cannot be created or written."""
    try:
        yield
    except (OSError, sqlite3.Error) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(
            f"{setting} {folder}: cannot create or write it ({reason}); choose a folder this "
            "user may write"
        ) from error
