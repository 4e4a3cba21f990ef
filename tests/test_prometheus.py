"""A real Prometheus server (the Debian package's binary) scrapes a running daemon with the shipped
scrape config and alert rules, and the daemon's metrics come back through Prometheus's query API."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml

from tests.conftest import DaemonProcess, free_port, settings_env, wait_drained

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
STREAM, GROUP = "cascade:interactions", "cascade"


class PrometheusServer:
    """``prometheus`` on a free loopback port, its TSDB under ``workdir``, scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is missing: `make test` installs it (Debian package prometheus)")
        config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
        config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
        config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["static_configs"][0]["targets"] = [target]
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.log = workdir / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query_until(self, promql: str, timeout: float = 60) -> list[dict]:
        """The instant vector of ``promql`` once it is non-empty (Prometheus starts and scrapes first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                result = self.api("query", query=promql)["result"]
                if result:
                    return result
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        raise AssertionError(f"{promql} returned nothing after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_for(tmp_path):
    started: list[PrometheusServer] = []

    def start(daemon: DaemonProcess) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        server = PrometheusServer(workdir, f"127.0.0.1:{daemon.port}")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_prometheus_scrapes_the_daemon_and_answers_queries(tmp_path, tiny_model, redis_url, daemon_factory,
                                                           prometheus_for):
    d = daemon_factory(settings_env(tmp_path / "home", tiny_model, redis_url))
    d.wait_healthy()
    r = redis.Redis.from_url(redis_url)
    for i in range(12):
        r.xadd(STREAM, {"prompt": f"Item {i} is", "response": f" number {i}.", "meta": '{"domain": "items"}'})
    r.xadd(STREAM, {"prompt": "no response"})  # dead-lettered as missing_field
    wait_drained(r, STREAM, GROUP, proc=d)

    prom = prometheus_for(d)
    (build,) = prom.query_until('cascade_build_info{job="cascade"}')
    assert build["metric"]["version"] and build["metric"]["service"] == "cascade-lm"
    (up,) = prom.query_until('up{job="cascade"}')
    assert up["value"][1] == "1"
    (received,) = prom.query_until('cascade_interactions_received_total{lineage="main"}')
    assert float(received["value"][1]) == 12
    (rejected,) = prom.query_until('cascade_interactions_rejected_total{reason="missing_field"}')
    assert float(rejected["value"][1]) == 1
    (lag,) = prom.query_until(f'cascade_stream_lag{{stream="{STREAM}",group="{GROUP}"}}')
    assert float(lag["value"][1]) == 0
    (params,) = prom.query_until('cascade_model_parameters{lineage="main"}')
    assert float(params["value"][1]) > 0

    (target,) = prom.api("targets")["activeTargets"]
    assert target["health"] == "up" and target["scrapeUrl"] == f"http://127.0.0.1:{d.port}/metrics"
    # The shipped alert rules load and evaluate against the real series without errors.
    deadline = time.monotonic() + 30
    while True:
        rules = [rule for g in prom.api("rules")["groups"] for rule in g["rules"]]
        if all(rule["health"] != "unknown" for rule in rules) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert rules and all(rule["health"] == "ok" for rule in rules), rules
