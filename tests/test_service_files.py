"""The operator files in service/: alert rules and dashboard refer only to metrics that exist."""

from __future__ import annotations

import json
import re

import yaml
from conftest import PROJECT_ROOT
from prometheus_client import REGISTRY

import pn2v_live.telemetry  # noqa: F401 - registers the metrics

SERVICE = PROJECT_ROOT / "service"
METRIC = re.compile(r"\bpn2v_live_[a-z_]+")


def exported_names() -> set[str]:
    """Every sample name the daemon exports (counters' _total, histograms' _bucket, ...)."""
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return {n for n in names if n.startswith("pn2v_live_")}


def test_alert_rules_are_valid_and_use_existing_metrics():
    rules = yaml.safe_load((SERVICE / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = {rule["alert"] for rule in alerts}
    assert {"PN2VLiveBacklogGrowing", "PN2VLiveNoFrames", "PN2VLiveTrainerFailing"} <= names
    exported = exported_names()
    for rule in alerts:
        assert rule["annotations"]["summary"]
        for metric in METRIC.findall(rule["expr"]):
            assert metric in exported, f"{rule['alert']}: unknown metric {metric}"


def test_dashboard_queries_use_existing_metrics():
    dashboard = json.loads((SERVICE / "grafana-dashboard.json").read_text())
    exported = exported_names()
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert queries
    for query in queries:
        for metric in METRIC.findall(query):
            assert metric in exported, f"dashboard: unknown metric {metric}"


def test_scrape_config_targets_the_default_metrics_address():
    config = yaml.safe_load((SERVICE / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "pn2v-live")
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]
