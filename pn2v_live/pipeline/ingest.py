"""What both ingest sources share: counting the frames they store and the items they reject."""

from __future__ import annotations

import logging
import time

from pn2v_live.storage.rejected import Rejected
from pn2v_live.telemetry import FRAMES_INGESTED, FRAMES_REJECTED, LAST_FRAME_TIMESTAMP

log = logging.getLogger(__name__)


def ingested(source: str) -> None:
    """Count a frame that `source` stored (`Store.put_raw` said "stored")."""
    FRAMES_INGESTED.labels(source=source).inc()
    LAST_FRAME_TIMESTAMP.set(time.time())


def reject(source: str, error: Rejected, what: str) -> None:
    """Log and count a rejected item (`what` names it for the log line, never for the metric)."""
    FRAMES_REJECTED.labels(source=source, reason=error.reason).inc()
    log.warning("%s rejected %s (%s): %s", source, what, error.reason, error)
