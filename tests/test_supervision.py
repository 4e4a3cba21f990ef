"""Supervision: start-up in any order, actors that die are brought back, and health says what is down.

Real redis-server processes of the test's own, real local Ray, the daemon as a subprocess."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import redis

from tests.conftest import free_port, metric_value, settings_env, wait_drained
from tests.redis_servers import needs_redis_server
from tests.test_daemon_e2e import GROUP, STREAM, interaction
from tests.test_faults import RedisServer


def healthz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())
    except OSError:
        return None


def wait_for(cond, what: str, timeout: float = 120, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"daemon exited while waiting for {what}:\n{proc.log.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout}s")


def handled(home) -> tuple[int, int]:
    """(learned + held out according to live/state.json, ids in the ledger)."""
    state = json.loads((home / "registry/main/live/state.json").read_text())
    ledger = sqlite3.connect(home / "registry/main/ledger.sqlite").execute("SELECT COUNT(*) FROM seen").fetchone()[0]
    return state["interactions_learned"] + state["counters"]["heldout_seen"], ledger


@needs_redis_server
def test_started_with_redis_down_it_waits_and_learns_once_redis_comes(tmp_path, tiny_model, daemon_factory):
    server = RedisServer(tmp_path, free_port())
    url = f"redis://127.0.0.1:{server.port}/0"
    home = tmp_path / "home"
    d = daemon_factory(settings_env(home, tiny_model, url, startup_timeout=120))
    wait_for(lambda: d.log.read_text().count("could not reach Redis") >= 2, "two logged tries", 60, d)
    assert "CASCADE_STARTUP_TIMEOUT" in d.log.read_text()
    server.start()
    try:
        r = redis.Redis(port=server.port)
        for i in range(24):
            r.xadd(STREAM, interaction(i))
        d.wait_healthy()
        wait_drained(r, STREAM, GROUP, proc=d)
        assert handled(home) == (24, 24)
        assert d.terminate() == 0
    finally:
        server.stop()


def test_past_the_startup_timeout_it_exits_1_with_one_sentence(tmp_path, tiny_model):
    env = settings_env(tmp_path / "home", tiny_model, f"redis://127.0.0.1:{free_port()}/0", startup_timeout=2)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "run"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("cascade: could not reach Redis at redis://127.0.0.1:") and "CASCADE_STARTUP_TIMEOUT=2 s" in last
    assert time.monotonic() - t0 < 60


@needs_redis_server
def test_redis_stopped_while_the_ingest_actor_is_created_is_recovered(tmp_path, tiny_model, daemon_factory):
    """As the issue reproduced it: Redis goes away right after Ray is up, while the ingest actor is being made."""
    server = RedisServer(tmp_path, free_port()).start()
    url = f"redis://127.0.0.1:{server.port}/0"
    home = tmp_path / "home"
    try:
        r = redis.Redis(port=server.port)
        for i in range(16):
            r.xadd(STREAM, interaction(i))
        d = daemon_factory(settings_env(home, tiny_model, url))
        wait_for(lambda: "local Ray started" in d.log.read_text(), "Ray's start", 120, d)
        server.stop()
        # While Redis is away: the daemon stays up, /healthz answers 503 naming redis, `cascade status` says so.
        doc = wait_for(lambda: (h := healthz(d.port)) and "redis" in h["down"] and h, "/healthz naming redis", 60, d)
        assert doc["status"] == "degraded" and doc["down"]["redis"]["since"].endswith("Z")
        status = subprocess.run([sys.executable, "-m", "daemon.cli", "status"], env=d.env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 1 and "cannot reach Redis" in status.stderr
        assert "redis down since" in status.stdout, status.stdout
        failed = d.log.read_text().count("reading the stream failed")  # it keeps trying, and stays up meanwhile
        wait_for(lambda: d.log.read_text().count("reading the stream failed") >= failed + 3, "3 more reads", 60, d)
        server.start()
        for i in range(16, 32):
            r.xadd(STREAM, interaction(i))
        wait_drained(r, STREAM, GROUP, proc=d)
        doc = wait_for(lambda: (h := healthz(d.port)) and not h["down"] and h, "every part up", 60, d)
        assert doc["status"] == "ok" and set(doc["parts"]) == {"redis", "ingest", "learner:main"}
        assert handled(home) == (32, 32)
        status = subprocess.run([sys.executable, "-m", "daemon.cli", "status"], env=d.env, capture_output=True,
                                text=True, timeout=60)
        assert status.returncode == 0 and "all parts up" in status.stdout, status.stdout + status.stderr
        assert d.terminate() == 0
    finally:
        server.stop()


def test_a_learner_killed_with_sigkill_is_restarted_and_resumes_from_its_checkpoint(tmp_path, tiny_model, redis_url,
                                                                                   daemon_factory):
    home = tmp_path / "home"
    d = daemon_factory(settings_env(home, tiny_model, redis_url))
    d.wait_healthy()
    m = d.metrics()  # known labels start at 0, before any event
    assert metric_value(m, "cascade_actor_restarts_total", kind="learner") == 0
    assert metric_value(m, "cascade_interactions_rejected_total", reason="learn_failed") == 0
    assert metric_value(m, "cascade_interactions_rejected_total", reason="bad_meta") == 0
    assert metric_value(m, "cascade_reductions_total", lineage="main", outcome="failed") == 0
    assert metric_value(m, "cascade_update_rollbacks_total", lineage="main", reason="forgetting") == 0
    r = redis.Redis.from_url(redis_url)
    for i in range(24):
        r.xadd(STREAM, interaction(i))
    wait_drained(r, STREAM, GROUP, proc=d)
    before = json.loads((home / "registry/main/live/state.json").read_text())
    learner = wait_for(lambda: (h := healthz(d.port)) and h["parts"]["learner:main"]["up"] and h["parts"]["learner:main"],
                       "the learner up", 60, d)
    assert metric_value(d.metrics(), "cascade_part_up", part="learner:main") == 1

    os.kill(learner["pid"], signal.SIGKILL)  # the actor's worker process, as the OOM killer would
    # Ray may bring the process back before the next health check sees it gone (on an idle machine, within
    # the 5 s between checks): then the supervisor sees only the new incarnation. Either is a recovery.
    def down_or_replaced():
        h = healthz(d.port)
        if not h:
            return None
        part = h["parts"]["learner:main"]
        return h["down"].get("learner:main") or (part["up"] and part["pid"] != learner["pid"] and part)
    seen = wait_for(down_or_replaced, "/healthz naming the learner down, or a new learner process", 60, d)
    if not seen.get("up"):
        assert seen["reason"] and seen["since"].endswith("Z")
    for i in range(24, 48):  # published while it is down
        r.xadd(STREAM, interaction(i))
    again = wait_for(lambda: (h := healthz(d.port)) and h["parts"]["learner:main"]["up"] and h["parts"]["learner:main"],
                     "the learner back", 120, d)
    assert again["pid"] != learner["pid"] and again["restarts"] == 1
    wait_drained(r, STREAM, GROUP, proc=d)
    after = json.loads((home / "registry/main/live/state.json").read_text())
    # It went on from its checkpoint: steps and counts continue, nothing learned twice, nothing lost.
    assert after["step"] > before["step"] and after["update_steps"] > before["update_steps"]
    assert handled(home) == (48, 48)
    assert r.xlen(f"{STREAM}:dead") == 0
    m = d.metrics()
    assert metric_value(m, "cascade_actor_restarts_total", kind="learner") == 1
    assert metric_value(m, "cascade_actor_restarts_total", kind="ingest") == 0
    assert "learner:main restarted by Ray" in d.log.read_text()
    assert d.terminate() == 0


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=128 << 20,
             _node_ip_address="127.0.0.1", logging_level="ERROR")
    yield ray
    ray.shutdown()


def test_an_actor_whose_constructor_raises_is_created_again_with_back_off(tmp_path, local_ray):
    """Ray gives up on an actor whose creation task raised; the supervisor makes it again until it lives."""
    from daemon.actors import actor_info
    from daemon.metrics import Metrics
    from daemon.supervisor import Backoff, Supervisor

    ray = local_ray
    blocker = tmp_path / "dependency-down"
    blocker.touch()

    @ray.remote(num_cpus=0)
    class Flaky:
        def __init__(self, path: str) -> None:
            if os.path.exists(path):
                raise ConnectionError("dependency down")
            self.info = actor_info()

        def ready(self):
            return self.info

    metrics = Metrics("test")
    sup = Supervisor(metrics, {"ingest": Backoff(0.2, 1.0)})
    sup.add("ingest", "ingest", lambda: Flaky.remote(str(blocker)))

    def tick_until(cond, timeout=60):
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline
            sup.tick()
            time.sleep(0.05)

    tick_until(lambda: sup.parts["ingest"].restarts >= 2)  # dead, made again, dead again...
    h = sup.health()["ingest"]
    assert not h["up"] and "dependency down" in h["reason"]
    blocker.unlink()
    tick_until(lambda: sup.is_up("ingest"))
    restarts = sup.parts["ingest"].restarts
    assert metrics.actor_restarts.labels("ingest")._value.get() == restarts >= 2
    assert metrics.part_up.labels("ingest")._value.get() == 1
    assert ray.get(sup.handle("ingest").ready.remote()).pid > 0
    sup.remove_all()
