"""Crash-safe files: a reader (or a restart after SIGKILL or power loss) sees the old file or the
new one, never a partial one, and what a caller was told is written is on disk.

A file is on disk after a power cut only once its data is fsynced *and* every folder entry
leading to it is: the folder holding it, and each folder created on the way there (fsync of
the folder that holds the new folder's entry). `sync_paths` does many of these at once: each
fsync waits for the disk's cache flush (milliseconds on a virtual disk), and concurrent fsyncs
share one, so a group of them costs about as much as a single one.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

SYNC_THREADS = 8  # concurrent fsyncs of one group (see sync_paths)

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, fsync it, rename it over `path`,
    then fsync the folder so the rename itself is durable. Creates parent folders (durably)."""
    path = Path(path)
    make_folders(path.parent)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def make_folders(folder: str | Path) -> Path:
    """Create `folder` and its missing parents, and fsync the parent of each one created, so
    the new folders survive a power cut (nothing is synced when `folder` already exists)."""
    folder = Path(folder)
    missing = []
    probe = folder
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        sync_folder(created.parent)
    return folder


def sync_folder(folder: str | Path) -> None:
    """fsync `folder`, making the renames and deletions done in it so far durable."""
    sync_path(folder)


def sync_path(path: str | Path) -> None:
    """fsync the file or folder at `path` (opened read-only: fsync needs no write access)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sync_paths(paths: Iterable[str | Path]) -> None:
    """fsync every file and folder in `paths` (duplicates once), concurrently; returns when
    all are on disk. Raises the first error once every fsync has finished."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    if len(unique) <= 1:
        for path in unique:
            sync_path(path)
        return
    futures = [_sync_pool().submit(sync_path, path) for path in unique]
    for error in [future.exception() for future in futures]:
        if error is not None:
            raise error


def _sync_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fsync")
        return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone: start a new pool there when needed."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)
