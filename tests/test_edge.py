"""The edge node end to end on this machine: a daemon (real Redis, Ray, Ray Serve, CASCADE_EXPORT) and
``cascade edge`` on loopback, talked to with the official openai client."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import redis

from tests.conftest import ROOT, DaemonProcess, free_port, metric_value, settings_env, wait_drained

STREAM = "cascade:interactions"


class EdgeProcess:
    def __init__(self, api: str, home: Path, log: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "edge", "--api", api, "--lineage", "main", "--type", "q8_0",
             "--home", str(home), "--port", str(self.port), "--poll", "1", "--flush", "1"],
            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.base, self.log = f"http://127.0.0.1:{self.port}", log
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=60)

    def health(self) -> dict:
        deadline = time.monotonic() + 60
        while True:
            try:
                return httpx.get(f"{self.base}/healthz", timeout=5).json()
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"edge node not answering:\n{self.log.read_text()[-3000:]}") from None
                time.sleep(0.3)

    def wait(self, pred, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while not pred(h := self.health()):
            assert time.monotonic() < deadline, f"edge health still {h}:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.3)
        return h

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _wait_api(base: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{base} never answered /v1/models")


def _edge_entries(r: redis.Redis) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(STREAM)
            if f.get(b"id", b"").startswith(b"edge-")]


def test_edge_node_follows_promotions_serves_locally_and_feeds_back_exactly_once(tmp_path, tiny_model, redis_url):
    r = redis.Redis.from_url(redis_url)
    home, port = tmp_path / "home", free_port()
    env = settings_env(home, tiny_model, redis_url, serve="on", serve_port=port, export="gguf:q8_0,gguf:f16",
                       calibration_items=32, gate="off", heldout_fraction=0)
    api = f"http://127.0.0.1:{port}"
    d = DaemonProcess(env, tmp_path / "daemon.log")
    edge = None
    try:
        d.wait_healthy(timeout=240)
        _wait_api(api)
        assert httpx.get(f"{api}/v1/exports/main").json()["data"] == []  # gen-0000 was not promoted: no export
        edge = EdgeProcess(api, tmp_path / "edge", tmp_path / "edge.log")
        assert edge.health()["status"] == "waiting"
        err = httpx.post(f"{edge.base}/v1/completions", json={"model": "main", "prompt": "x"})
        assert err.status_code == 503 and err.json()["error"]["code"] == "model_not_ready"

        # A promotion: the daemon exports gen-0001, and the edge node picks it up by itself.
        for i in range(24):
            r.xadd(STREAM, {"prompt": f"Item {i} is", "response": f" number {i % 3}."})
        wait_drained(r, STREAM, "cascade", proc=d)
        out = subprocess.run([sys.executable, "-m", "daemon.cli", "reduce", "--lineage", "main"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 300
        while not r.xlen("cascade:generations"):
            assert time.monotonic() < deadline, d.log.read_text()[-3000:]
            time.sleep(0.5)
        (_, event), = r.xrange("cascade:generations")
        exports = json.loads(event[b"exports"])
        assert exports == json.loads(event[b"card"])["exports"] and [e["type"] for e in exports] == ["q8_0", "f16"]
        listed = httpx.get(f"{api}/v1/exports/main").json()["data"]
        q8 = next(e for e in listed if e["type"] == "q8_0")
        assert q8["generation"] == "main/gen-0001" and q8["sha256"] == exports[0]["sha256"]
        assert metric_value(d.metrics(), "cascade_exports_total", lineage="main", outcome="ok") == 2
        assert metric_value(d.metrics(), "cascade_exports_total", lineage="main", outcome="failed") == 0
        # The download endpoint: the file as listed, its sha256 as ETag, 304 when unchanged.
        got = httpx.get(f"{api}/v1/exports/main/{q8['file']}")
        assert got.status_code == 200 and got.headers["etag"] == f'"{q8["sha256"]}"' and len(got.content) == q8["bytes"]
        assert httpx.get(f"{api}/v1/exports/main/{q8['file']}",
                         headers={"If-None-Match": f'"{q8["sha256"]}"'}).status_code == 304

        h = edge.wait(lambda h: h["generation"] == "main/gen-0001")
        assert h["downloads"] == 1 and h["file"] == q8["file"]
        assert (tmp_path / "edge" / "models" / q8["file"]).stat().st_size == q8["bytes"]
        polls = h["polls"]  # three more polls: the unchanged ETag is not downloaded again
        assert edge.wait(lambda h: h["polls"] >= polls + 3)["downloads"] == 1

        # Served locally through the same API shape (completions, chat, streaming), feedback sent back.
        c = edge.client
        assert {m.id for m in c.models.list().data} == {"main", "main/gen-0001"}
        done = c.completions.create(model="main", prompt="Item 3 is", max_tokens=6, temperature=0)
        assert done.system_fingerprint == "main/gen-0001@0" and done.usage.completion_tokens >= 1
        chat = c.chat.completions.create(model="main/gen-0001", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.system_fingerprint == "main/gen-0001@0"
        chunks = list(c.chat.completions.create(model="main", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0, stream=True))
        assert chunks and all(ch.system_fingerprint == "main/gen-0001@0" for ch in chunks)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
        fb = httpx.post(f"{edge.base}/v1/feedback", json={"id": done.id, "reward": 0.5})
        assert fb.status_code == 202
        assert httpx.post(f"{edge.base}/v1/feedback", json={"id": "cmpl-unknown", "reward": 1}).status_code == 404
        edge.wait(lambda h: h["sent"] == 1 and h["outbox"] == 0)
        (sent,) = _edge_entries(r)
        assert sent["prompt"] == "Item 3 is" and sent["response"] == done.choices[0].text and sent["reward"] == "0.5"
        assert json.loads(sent["meta"])["served"] == "main/gen-0001@0" and sent["lineage"] == "main"

        # The link goes down: the edge node still answers, and buffers feedback on disk, across its own restart.
        assert d.terminate() == 0
        failures = edge.health()["send_failures"]
        offline = [c.completions.create(model="main", prompt=f"Item {i} is", max_tokens=4, temperature=0)
                   for i in (5, 6)]
        assert httpx.post(f"{edge.base}/v1/feedback", json={"id": offline[0].id, "reward": 1}).status_code == 202
        assert httpx.post(f"{edge.base}/v1/feedback",
                          json={"id": offline[1].id, "response": " number 0."}).status_code == 202
        h = edge.wait(lambda h: h["send_failures"] >= failures + 2)  # two failed sends
        assert h["outbox"] == 2 and h["link_up"] is False
        edge.kill()
        edge = EdgeProcess(api, tmp_path / "edge", tmp_path / "edge.log")
        h = edge.wait(lambda h: h["status"] == "ok")  # its model from disk, with the daemon still down
        assert h["generation"] == "main/gen-0001" and h["outbox"] == 2
        assert edge.client.completions.create(model="main", prompt="x", max_tokens=2).choices

        # The daemon comes back: the buffered feedback arrives, exactly once, with nothing downloaded again.
        d = DaemonProcess(env, tmp_path / "daemon-2.log")
        d.wait_healthy(timeout=240)
        h = edge.wait(lambda h: h["outbox"] == 0 and h["sent"] == 2, timeout=240)
        assert h["downloads"] == 0
        entries = _edge_entries(r)
        assert sorted(e["id"] for e in entries) == sorted({e["id"] for e in entries}) and len(entries) == 3
        assert {e["response"] for e in entries} >= {" number 0."}
        wait_drained(r, STREAM, "cascade", proc=d)
    finally:
        if edge is not None:
            edge.kill()
        d.kill()


def test_edge_command_bad_input_is_one_sentence(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env["PYTHONPATH"] = str(ROOT)
    for args, says in ((("--api", "ftp://x"), "--api must be"), (("--api", "http://127.0.0.1:9", "--type", "q3"),
                                                                 "unsupported GGUF type"),
                       (("--api", "http://127.0.0.1:9", "--lineage", "../x"), "invalid lineage")):
        r = subprocess.run([sys.executable, "-m", "daemon.cli", "edge", *args, "--home", str(tmp_path / "e")],
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and says in r.stderr and r.stderr.count("\n") == 1, r.stderr
