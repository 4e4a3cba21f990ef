"""`cascade serve`: the API alone on a registry, with API keys, export downloads, a replica killed with kill -9
under load, and its Redis going away (a redis-server of the module's own)."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil
import pytest

from daemon.foundation import ensure_foundation
from daemon.registry import Registry, atomic_write_json, read_json
from tests.conftest import free_port, metric_value, settings_env
from tests.redis_servers import RedisServer, needs_redis_server

pytestmark = needs_redis_server
KEY = "test-key-2"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("serve-home")
    ensure_foundation(Registry(home / "registry").lineage("main"), tiny_model)
    server = RedisServer(tmp_path_factory.mktemp("serve-redis")).start()
    port = free_port()
    env = settings_env(home, tiny_model, server.url, serve_port=port, api_keys=f"test-key-1,{KEY}")
    log = home / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve"], env=env, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"cascade serve did not answer:\n{log.read_text()[-3000:]}")
        yield {"base": base, "proc": proc, "home": home, "redis": server, "log": log,
               "metrics": f"http://127.0.0.1:{env['CASCADE_METRICS_PORT']}/metrics",
               "client": openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=60)}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        server.stop()


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def test_api_keys_are_required_when_set(served):
    base = served["base"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(f"{base}/v1/completions", json={"model": "main", "prompt": "a"}, headers=headers, timeout=30)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/v1/models", timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
    out = served["client"].completions.create(model="main", prompt="Hi", max_tokens=2)
    assert out.system_fingerprint == "main/gen-0000@0"  # no learner: the generation alone
    text = httpx.get(served["metrics"], timeout=10).text  # `cascade serve`'s own /metrics
    assert metric_value(text, "cascade_serve_requests_total", endpoint="completions", status="401") >= 1


def test_exports_are_listed_and_downloaded_with_etag_and_ranges(served):
    gen_dir = served["home"] / "registry/main/gen-0000"
    (gen_dir / "export").mkdir(exist_ok=True)
    data = os.urandom(3000)
    (gen_dir / "export/model-q8_0.gguf").write_bytes(data)
    (gen_dir / "secret.txt").write_text("outside export/")
    (gen_dir / "export/link.gguf").symlink_to(gen_dir / "secret.txt")
    sha = hashlib.sha256(data).hexdigest()
    card = read_json(gen_dir / "card.json")
    card["exports"] = [{"format": "gguf", "type": "q8_0", "path": "export/model-q8_0.gguf", "bytes": len(data),
                        "sha256": sha},
                       {"format": "gguf", "type": "f16", "path": "export/../secret.txt", "bytes": 1, "sha256": "0"},
                       {"format": "gguf", "type": "f16", "path": "export/link.gguf", "bytes": 1, "sha256": "0"}]
    atomic_write_json(gen_dir / "card.json", card)
    base = served["base"]
    listing = httpx.get(f"{base}/v1/exports/main", headers=auth(), timeout=30).json()["data"]
    assert listing[0] == {"file": "model-q8_0.gguf", "format": "gguf", "type": "q8_0", "bytes": 3000,
                          "sha256": sha, "generation": "main/gen-0000"}
    resp = httpx.get(f"{base}/v1/exports/main/model-q8_0.gguf", headers=auth(), timeout=30)
    assert resp.status_code == 200 and resp.content == data and resp.headers["etag"] == f'"{sha}"'
    part = httpx.get(f"{base}/v1/exports/main/model-q8_0.gguf", headers={**auth(), "Range": "bytes=10-19"}, timeout=30)
    assert part.status_code == 206 and part.content == data[10:20]
    same = httpx.get(f"{base}/v1/exports/main/model-q8_0.gguf", headers={**auth(), "If-None-Match": f'"{sha}"'},
                     timeout=30)
    assert same.status_code == 304
    for name in ("secret.txt", "link.gguf", "..%2Fsecret.txt", "config.json"):
        resp = httpx.get(f"{base}/v1/exports/main/{name}", headers=auth(), timeout=30)
        assert resp.status_code == 404, (name, resp.status_code)
        assert b"outside" not in resp.content
    assert httpx.get(f"{base}/v1/exports/nope", headers=auth(), timeout=30).status_code == 404
    assert httpx.get(f"{base}/v1/exports/main/x", timeout=30).status_code == 401


def replica_pids(proc) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "ServeReplica" in " ".join(p.info["cmdline"] or []) and os.getsid(p.info["pid"]) == proc.pid:
                out.append(p.info["pid"])
        except (psutil.Error, OSError):
            continue
    return out


def test_a_replica_killed_under_load_is_replaced(served):
    (victim,) = replica_pids(served["proc"])
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                served["client"].completions.create(model="main", prompt="Hi", max_tokens=8, timeout=10)
                results.append((time.monotonic(), True))
            except openai.OpenAIError:
                results.append((time.monotonic(), False))
                time.sleep(0.2)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed_at + 180
        while time.monotonic() < deadline and not any(ok and t > killed_at + 1 for t, ok in results):
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert any(ok and t > killed_at + 1 for t, ok in results), served["log"].read_text()[-3000:]
    assert any(ok for t, ok in results if t < killed_at)
    assert victim not in replica_pids(served["proc"]) and replica_pids(served["proc"])


def test_redis_down_completions_answered_feedback_refused_with_retry_after(served):
    c = served["client"]
    out = c.completions.create(model="main", prompt="Hello", max_tokens=3)
    served["redis"].stop()
    during = c.completions.create(model="main", prompt="Hello", max_tokens=3)
    assert during.system_fingerprint == out.system_fingerprint  # answered without Redis
    assert during.choices[0].finish_reason in ("length", "stop")
    for path, body in (("/v1/feedback", {"id": out.id, "reward": 1}),
                       ("/v1/interactions", {"interactions": [{"prompt": "a", "response": "b"}]})):
        resp = httpx.post(f"{served['base']}{path}", json=body, headers=auth(), timeout=30)
        assert resp.status_code == 503, resp.text
        assert int(resp.headers["retry-after"]) > 0 and resp.json()["error"]["code"] == "redis_unavailable"
    assert c.models.list().data  # still up
