"""What the writer repairs when it opens an acquisition after a crash or power cut.

A killed writer may leave temporary chunk files (`*.partial`) behind, and a power cut may lose a
chunk whose ledger row survived only if the disk lied about its fsync; both are found here when
an acquisition is opened, so the frames concerned are simply stored again when resent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zarr

from pn2v_live.storage.layout import chunk_file
from pn2v_live.storage.ledger import Ledger

log = logging.getLogger(__name__)


def sweep_partials(path: Path, name: str) -> None:
    """Remove the temporary chunk files (`*.partial`) of writes a killed writer never finished
    under acquisition `name` at `path`. Only the store's one writer may call this, before it
    writes there, so none is still in use."""
    partials = list(path.rglob("*.partial"))
    for partial in partials:
        partial.unlink(missing_ok=True)
    if partials:
        log.info("%s: removed %d unfinished chunk write(s)", name, len(partials))


def reconcile(ledger: Ledger, name: str, raw: zarr.Array) -> list[int]:
    """The raw frames of acquisition `name` that the ledger records and whose chunk in `raw`
    really exists, ascending; the others are forgotten (logged).

    Safe while another process writes the acquisition: a ledger row always follows its chunk.
    """
    frames = ledger.frames(name)
    missing = [t for t in frames if not chunk_file(raw, t).is_file()]
    if missing:
        log.warning(
            "%s: %d frame(s) recorded in the ledger have no chunk (power cut?); "
            "they will be stored again when resent: %s",
            name,
            len(missing),
            missing[:20],
        )
        ledger.forget_frames(name, missing)
    return sorted(set(frames) - set(missing))
