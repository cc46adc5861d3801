"""What an acquisition holds, in a few numbers, read without opening it.

Opening an acquisition (`Store.acquisition`) reads its ledger rows and checks every chunk file,
and keeps per-frame state in memory; listing thousands of old acquisitions that way takes
seconds per thousand and memory per acquisition. A `Summary` costs two small metadata files
(the group's attributes and the raw array's) and two ledger counts, or nothing beyond memory
when the acquisition is open (`of_acquisition`, exact to the last frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pn2v_live.storage.layout import metadata_document

if TYPE_CHECKING:
    from pn2v_live.storage.acquisition import Acquisition


@dataclass(frozen=True)
class Summary:
    """One acquisition's counts: `valid_t` (readable frames from t = 0, see `Acquisition`),
    `stored` raw frames, `denoised` of those with a twin, whether it is `closed`, its (Y, X)
    `frame_shape` and raw `dtype`, and when its newest raw frame was stored (`last_frame_at`,
    unix s, None when unknown)."""

    name: str
    valid_t: int
    stored: int
    denoised: int
    closed: bool
    frame_shape: tuple[int, int]
    dtype: str
    last_frame_at: float | None

    @property
    def untwinned(self) -> int:
        """Stored raw frames without a denoised twin."""
        return self.stored - self.denoised


def of_acquisition(acquisition: Acquisition) -> Summary:
    """The summary of an open acquisition, from its memory."""
    untwinned = acquisition.untwinned_count
    return Summary(
        name=acquisition.name,
        valid_t=acquisition.valid_t,
        stored=acquisition.frame_count,
        denoised=acquisition.frame_count - untwinned,
        closed=bool(acquisition.closed),
        frame_shape=acquisition.frame_shape,
        dtype=str(acquisition.dtype),
        last_frame_at=acquisition.last_frame_at,
    )


def read_summary(path: Path, name: str, stored: int, denoised: int) -> Summary:
    """The summary of the acquisition `name` at `path` from its metadata files, with the
    `stored` and `denoised` counts the ledger has; raises (OSError, ValueError, KeyError...) when
    they cannot be read (gone, damaged)."""
    attributes = metadata_document(path, "")
    raw = metadata_document(path / "raw" / "0", "array")
    state = attributes.get("pn2v_live", {})
    last = state.get("last_frame_at")
    return Summary(
        name=name,
        valid_t=int(state.get("valid_t", 0)),
        stored=stored,
        denoised=denoised,
        closed=bool(state.get("closed", False)),
        frame_shape=tuple(int(n) for n in raw["shape"][3:]),
        dtype=str(np.dtype(raw.get("dtype", raw.get("data_type")))),
        last_frame_at=float(last) if isinstance(last, int | float) else None,
    )
