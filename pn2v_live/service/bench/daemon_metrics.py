"""Reading a running daemon's Prometheus endpoint, for the benches that drive `pn2v-live serve`."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

from prometheus_client.samples import Sample

from pn2v_live.errors import UserError

METRICS_TIMEOUT_S = 2.0
LOG_TAIL_LINES = 20


def metrics_url(log_path: Path, timeout: float = 30.0) -> str:
    """The daemon's /metrics address, from its start-up log line "metrics at URL" in
    `log_path`; UserError (with the log's last lines) when it does not appear within `timeout`
    seconds."""
    deadline, text = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        try:
            text = log_path.read_text("utf-8", "replace")
        except OSError:
            text = ""
        found = re.search(r"metrics at (http://\S+/metrics)", text)
        if found:
            return found.group(1)
        time.sleep(0.2)
    tail = "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
    raise UserError(f"the daemon's log names no metrics address:\n{tail}")


def read_metrics(url: str) -> list[Sample]:
    """Every sample the daemon's /metrics exports; OSError/ValueError when it does not answer
    within METRICS_TIMEOUT_S."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=METRICS_TIMEOUT_S) as response:
        text = response.read().decode("utf-8")
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def total(samples: list[Sample], name: str, **excluded: str) -> float | None:
    """The sum of sample `name` over its label sets, leaving out those whose label equals an
    `excluded` value (e.g. outcome="failed"); None when the endpoint exported none."""
    values = [
        sample.value
        for sample in samples
        if sample.name == name
        and not any(sample.labels.get(label) == value for label, value in excluded.items())
    ]
    return float(sum(values)) if values else None
