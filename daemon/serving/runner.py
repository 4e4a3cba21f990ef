"""Ray Serve in the Ray the process already started or joined: start the API, stop it, and ``cascade serve``.

Cores: each replica declares ``CASCADE_SERVE_CPUS`` (1) to Ray and runs as many torch threads; learners declare
``CASCADE_LEARNER_CPUS`` (0 = they share the node's cores and take turns). On a 2-core machine with the defaults
Ray places one replica on one of the two cores it counts, and the learner keeps its two threads: serving and
learning then share the cores through the OS scheduler (docs/serving.md has the measured cost). Declaring
``CASCADE_LEARNER_CPUS=1`` makes the split strict. On a cluster, more replicas land wherever CPUs (or, with
GPUs in the cluster, ``CASCADE_SERVE_GPUS`` of one) are free.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from daemon.config import Settings

APP = "cascade"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("cascade.serving")


def start_serving(settings: Settings, redis_url: str, metrics_registry) -> None:
    """Deploy the API (returns once a replica is ready) and show its metrics on ``metrics_registry``."""
    import ray
    from ray import serve

    from daemon.serving.app import CascadeAPI
    from daemon.serving.stats import RemoteCollector, stats_actor

    s = settings
    if s.serve_host not in LOOPBACK and not s.api_key_list():
        log.warning("!!! the API on %s:%d answers ANYONE who can reach this machine: CASCADE_SERVE_HOST is beyond "
                    "loopback and CASCADE_API_KEYS is unset — set API keys or bind 127.0.0.1 !!!", s.serve_host,
                    s.serve_port)
    metrics_registry.register(RemoteCollector(stats_actor(create=True)))
    gpus = s.serve_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    serve.start(http_options={"host": s.serve_host, "port": s.serve_port, "keep_alive_timeout_s": 30},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    deployment = CascadeAPI.options(
        num_replicas=s.serve_replicas, ray_actor_options={"num_cpus": s.serve_cpus, "num_gpus": gpus},
        # More may reach a replica than its batcher takes, so the batcher's bound answers first (429 +
        # Retry-After); Serve's own queue (503 beyond it) bounds what is beyond that.
        max_ongoing_requests=s.serve_max_batch + 2 * s.serve_max_queue, max_queued_requests=s.serve_max_queue,
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    serve.run(deployment.bind(s, redis_url), name=APP, route_prefix="/")
    log.info("API on http://%s:%d/v1 (%d replica(s), %g CPU each%s)", s.serve_host, s.serve_port, s.serve_replicas,
             s.serve_cpus, f", {gpus} GPU" if gpus else "")


def stop_serving() -> None:
    from ray import serve

    try:
        serve.shutdown()
    except Exception as e:  # noqa: BLE001 - stopping goes on whatever Serve says
        log.warning("stopping Serve: %s", e)


def serving_health() -> dict:
    from ray import serve

    try:
        status = serve.status().applications[APP].status
    except Exception as e:  # noqa: BLE001
        return {"status": "degraded", "serve": f"unavailable: {type(e).__name__}"}
    return {"status": "ok" if status == "RUNNING" else "degraded", "serve": str(status)}


def _start_ray(settings: Settings) -> bool:
    """Join ``CASCADE_RAY_ADDRESS`` or start a local Ray as the daemon does; True when this process started it."""
    from daemon.service import Daemon

    if not settings.ray_address:
        Daemon._secure_local_ray_env()
    import ray

    runtime_env = {"worker_process_setup_hook": "daemon.actors.setup_worker",
                   "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return False
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 << 20,
             _node_ip_address="127.0.0.1", runtime_env=runtime_env, logging_level=logging.WARNING,
             configure_logging=False)
    return True


def serve_forever(settings: Settings) -> int:
    """``cascade serve``: the API alone (no learning), following the registry, until SIGTERM/SIGINT."""
    from daemon.embedded_redis import EmbeddedRedis
    from daemon.metrics import Metrics, MetricsServer
    from daemon.service import package_version

    stop = threading.Event()
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:  # the daemon's embedded Redis when it runs (reused), else one of our own
        embedded = EmbeddedRedis(settings.home).start()
        redis_url = embedded.url
    started = _start_ray(settings)  # first: Ray reads its settings when it is first imported
    import ray

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    metrics = Metrics(package_version())
    server = None
    try:
        start_serving(settings, redis_url, metrics.registry)
        server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port, serving_health).start()
        log.info("serving metrics on http://%s:%d/metrics", settings.metrics_host, server.port)
        stop.wait()
    finally:
        stop_serving()
        if server is not None:
            server.stop()
        if started:
            ray.shutdown()
        if embedded is not None:
            embedded.stop()
    return 0
