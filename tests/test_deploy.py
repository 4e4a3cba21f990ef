"""The operators' files: Prometheus config and alerts (checked and unit-tested by promtool), the
Grafana dashboard (every query names a metric the daemon exports), the systemd unit."""
from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from daemon.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def exported_names() -> set[str]:
    names = {"up"}
    for family in Metrics("test").registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


PROMQL_WORDS = {"sum", "by", "rate", "increase", "delta", "histogram_quantile", "clamp_min", "and", "or", "le",
                "lineage", "reason", "outcome", "stream", "group", "domain", "job", "instance", "m", "h", "s"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"(?<![\w])\d[\d.eE+-]*", "", expr)  # numbers such as 1e-9
    return {w for w in re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr) if w not in PROMQL_WORDS}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    return path


@pytest.mark.parametrize("args", [("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                                  ("test", "rules", "alerts_test.yml")])
def test_promtool_accepts_config_rules_and_alert_tests(promtool, args):
    out = subprocess.run([promtool, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_and_names_real_metrics():
    alerts = (DEPLOY / "prometheus/alerts.yml").read_text()
    tests = (DEPLOY / "prometheus/alerts_test.yml").read_text()
    names = re.findall(r"- alert: (\w+)", alerts)
    assert len(names) >= 6
    for name in names:
        assert f"alertname: {name}" in tests, f"alert {name} has no promtool unit test"
    for expr in re.findall(r"expr: (.+)", alerts):
        assert metric_names(expr) <= exported_names(), expr


def test_grafana_dashboard_is_valid_and_queries_exported_metrics():
    dash = json.loads((DEPLOY / "grafana/cascade-dashboard.json").read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    titles = [p["title"] for p in dash["panels"]]
    assert len(set(p["id"] for p in dash["panels"])) == len(titles)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for expr in exprs:
        assert metric_names(expr) <= exported_names(), expr
    used = set().union(*(metric_names(e) for e in exprs))
    for needed in ("cascade_interactions_received_total", "cascade_stream_lag", "cascade_update_steps_total",
                   "cascade_train_loss", "cascade_heldout_loss", "cascade_forgetting", "cascade_update_rollbacks_total",
                   "cascade_generation", "cascade_model_parameters", "cascade_reduction_seconds_bucket"):
        assert needed in used, f"no panel shows {needed}"


def test_systemd_unit_runs_the_daemon_and_stops_it_gracefully():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd/cascade.service")
    svc = unit["Service"]
    assert svc["ExecStart"].split()[1:3] == ["run", "--config"] and svc["ExecStart"].split()[0].endswith("/cascade")
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) >= 300
    assert svc["Restart"] == "on-failure" and svc["User"] != "root"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
