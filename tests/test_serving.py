"""The API as `cascade run` serves it beside learning: real Ray Serve, real Redis, the official openai client.

One daemon for the module (tiny model, free ports): listing, completions, chat, streaming, the fingerprint moving
after learning and after a promotion without a restart, an in-flight stream surviving a swap, feedback learned
once, HTTP interactions, every error status, batching, the metrics, loopback by default.
"""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import psutil
import pytest
import redis

from tests.conftest import REDIS_HOST, REDIS_PORT, DaemonProcess, free_port, metric_value, settings_env, wait_drained

STREAM = "cascade:interactions"


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model):
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    r.flushdb()
    home = tmp_path_factory.mktemp("serving-home")
    port = free_port()
    env = settings_env(home, tiny_model, f"redis://{REDIS_HOST}:{REDIS_PORT}/0", serve="on", serve_port=port,
                       gate="off", heldout_fraction=0, serve_max_batch=2, serve_max_queue=2,
                       serve_max_body_bytes=4096, serve_max_prompt_tokens=64, serve_max_tokens=300)
    d = DaemonProcess(env, home / "daemon.log")
    try:
        d.wait_healthy(timeout=240)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # /healthz answers before Serve has a replica
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield {"base": base, "port": port, "daemon": d, "redis": r, "home": home,
               "client": openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)}
    finally:
        d.terminate()
        r.flushdb()


def fingerprint(api, model: str = "main") -> str:
    return api["client"].completions.create(model=model, prompt="x", max_tokens=1, temperature=0).system_fingerprint


def wait_fingerprint(api, pred, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fp = fingerprint(api)
        if pred(fp):
            return fp
        time.sleep(0.5)
    raise AssertionError(f"fingerprint still {fp} after {timeout}s:\n{api['daemon'].log.read_text()[-3000:]}")


def test_lists_every_lineage_and_generation(api):
    ids = [m.id for m in api["client"].models.list().data]
    assert ids[:2] == ["main", "main/gen-0000"]


def test_completion_chat_and_stream_through_the_openai_client(api):
    c = api["client"]
    out = c.completions.create(model="main", prompt="Hello", max_tokens=5, temperature=0)
    assert out.system_fingerprint.startswith("main/gen-0000@")
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 5
    assert out.usage.prompt_tokens > 0 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    again = c.completions.create(model="main", prompt="Hello", max_tokens=5, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic
    alone = c.completions.create(model="main/gen-0000", prompt="Hello", max_tokens=5, temperature=0)
    assert alone.system_fingerprint == "main/gen-0000@0"

    chat = c.chat.completions.create(model="main", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    # The tokenizer's chat template wraps the message, so the prompt is longer than the message alone.
    assert chat.usage.prompt_tokens > 5

    chunks = list(c.chat.completions.create(model="main", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0, stream=True))
    assert all(ch.system_fingerprint == chat.system_fingerprint for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    seeded = [c.completions.create(model="main", prompt="Hello", max_tokens=6, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]

    with httpx.stream("POST", f"{api['base']}/v1/completions", json={"model": "main", "prompt": "Hi", "max_tokens": 3,
                                                                     "stream": True}, timeout=60) as resp:
        lines = [ln for ln in resp.iter_lines() if ln]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_feedback_is_learned_once_and_moves_the_fingerprint(api):
    c, d = api["client"], api["daemon"]
    before = fingerprint(api)
    out = c.completions.create(model="main", prompt="The capital of France is", max_tokens=4, temperature=0)
    for _ in range(2):  # sent twice, learned once
        resp = httpx.post(f"{api['base']}/v1/feedback", json={"id": out.id, "response": " Paris.", "reward": 1},
                          timeout=30)
        assert resp.status_code == 202, resp.text
        assert resp.json()["served"] == out.system_fingerprint
    entries = api["redis"].xrange(STREAM)
    fields = entries[-1][1]
    assert fields[b"id"] == f"feedback-{out.id}".encode() and fields[b"response"] == b" Paris."
    assert json.loads(fields[b"meta"]) == {"served": out.system_fingerprint}
    wait_drained(api["redis"], STREAM, "cascade", proc=d)
    text = d.metrics()
    assert metric_value(text, "cascade_interactions_learned_total", lineage="main") == 1
    assert metric_value(text, "cascade_interactions_duplicate_total", lineage="main") == 1
    assert metric_value(text, "cascade_serve_feedback_total", lineage="main", kind="correction") == 2
    after = wait_fingerprint(api, lambda fp: fp != before, timeout=60)  # the new checkpoint, no restart
    assert after.startswith("main/gen-0000@") and int(after.rsplit("@")[1]) > int(before.rsplit("@")[1])

    unknown = httpx.post(f"{api['base']}/v1/feedback", json={"id": "cmpl-nope", "reward": 1}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "completion_not_found"
    neither = httpx.post(f"{api['base']}/v1/feedback", json={"id": out.id}, timeout=30)
    assert neither.status_code == 400


def test_interactions_over_http_go_through_the_stream_validation(api):
    r = api["redis"]
    n_stream, n_dead = r.xlen(STREAM), r.xlen(f"{STREAM}:dead")
    items = [{"prompt": "2+2=", "response": " 4", "id": "edge-1", "meta": {"device": "phone"}},
             {"prompt": "", "response": "plain text", "reward": 0.5},
             {"prompt": "p", "response": "r", "reward": 7},
             {"prompt": "p", "response": "   "},
             {"prompt": "p", "response": "r", "colour": "red"},
             "not an object"]
    resp = httpx.post(f"{api['base']}/v1/interactions", json={"interactions": items}, timeout=30)
    assert resp.status_code == 202, resp.text
    doc = resp.json()
    assert doc["accepted"] == 2
    assert [(x["index"], x["reason"]) for x in doc["rejected"]] == [
        (2, "bad_reward"), (3, "empty_response"), (4, "unknown_field"), (5, "bad_body")]
    assert r.xlen(STREAM) == n_stream + 2 and r.xlen(f"{STREAM}:dead") == n_dead + 4
    dead = r.xrange(f"{STREAM}:dead")[-4:]
    assert [e[1][b"reason"] for e in dead] == [b"bad_reward", b"empty_response", b"unknown_field", b"bad_body"]
    assert all(e[1][b"source_id"].startswith(b"http:") for e in dead) and dead[0][1][b"reward"] == b"7"
    wait_drained(r, STREAM, "cascade", proc=api["daemon"])


def test_error_statuses_are_openai_shaped(api):
    base = api["base"]

    def post(path, body=None, raw=None):
        return httpx.post(f"{base}{path}", json=body, content=raw, timeout=30)

    cases = [
        (post("/v1/completions", raw=b"{not json"), 400, "invalid_request"),
        (post("/v1/completions", {"model": "main"}), 400, "invalid_request"),
        (post("/v1/completions", {"model": "main", "prompt": "a", "max_tokens": 301}), 400, "max_tokens_too_large"),
        (post("/v1/completions", {"model": "main", "prompt": "a", "temperature": 9}), 400, "invalid_request"),
        (post("/v1/chat/completions", {"model": "main", "messages": []}), 400, "invalid_request"),
        (post("/v1/completions", {"model": "nope", "prompt": "a"}), 404, "model_not_found"),
        (post("/v1/completions", {"model": "main/gen-0042", "prompt": "a"}), 404, "model_not_found"),
        (httpx.get(f"{base}/v1/nowhere", timeout=30), 404, "not_found"),
        (post("/v1/completions", {"model": "main", "prompt": "x" * 5000}), 413, "body_too_large"),
        (post("/v1/completions", {"model": "main", "prompt": "word " * 200}), 413, "prompt_too_long"),
    ]
    for resp, status, code in cases:
        assert resp.status_code == status, (status, resp.text)
        err = resp.json()["error"]
        assert err["code"] == code and err["message"] and err["type"]

    # Overload: 2 decoding + 2 waiting per replica; the rest are refused with Retry-After, never dropped silently.
    def one(_):
        return post("/v1/completions", {"model": "main", "prompt": "Hello", "max_tokens": 300, "stop": ["\x01"]})

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(12)))
    statuses = [a.status_code for a in answers]
    assert set(statuses) <= {200, 429, 503} and statuses.count(200) >= 2, statuses
    refused = [a for a in answers if a.status_code != 200]
    assert refused and all(a.headers.get("retry-after") for a in refused if a.status_code == 429)
    assert any(a.status_code == 429 for a in answers), statuses
    assert fingerprint(api)  # and the server still answers


def test_concurrent_requests_are_decoded_together_and_counted(api):
    def batches():
        text = api["daemon"].metrics()
        return metric_value(text, "cascade_serve_batch_size_count"), metric_value(text, "cascade_serve_batch_size_sum")

    n0, sum0 = batches()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: api["client"].completions.create(model="main", prompt="Hi", max_tokens=40,
                                                                 temperature=0), range(3)))
    n1, sum1 = batches()
    assert sum1 - sum0 == 3 and n1 - n0 < 3  # three requests, fewer batches: some were decoded together
    text = api["daemon"].metrics()
    assert metric_value(text, "cascade_serve_requests_total", lineage="main", endpoint="completions", status="200") >= 4
    assert metric_value(text, "cascade_serve_requests_total", lineage="unknown", endpoint="completions",
                        status="404") >= 1
    assert metric_value(text, "cascade_serve_tokens_total", lineage="main", kind="completion") > 0
    assert metric_value(text, "cascade_serve_time_to_first_token_seconds_count") > 0
    assert metric_value(text, "cascade_serve_request_seconds_count") > 0


def test_the_api_listens_on_loopback_only_by_default(api):
    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == api["port"]]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def test_promotion_swaps_weights_while_a_stream_in_flight_finishes_on_its_own(api):
    before = fingerprint(api)
    resp_cm = httpx.stream("POST", f"{api['base']}/v1/completions", timeout=120,
                           json={"model": "main", "prompt": "Once", "max_tokens": 300, "stream": True})
    resp = resp_cm.__enter__()
    try:
        lines = resp.iter_lines()
        first = json.loads(next(ln for ln in lines if ln)[6:])
        assert first["system_fingerprint"] == before
        api["redis"].xadd("cascade:control", {"command": "reduce", "lineage": "main"})
        after = wait_fingerprint(api, lambda fp: fp.startswith("main/gen-0001@"))
        rest = [ln for ln in lines if ln]  # the in-flight stream, read after the swap
    finally:
        resp_cm.__exit__(None, None, None)
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in rest[:-1]]
    assert chunks and all(ch["system_fingerprint"] == before for ch in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert after != before
    ids = [m.id for m in api["client"].models.list().data]
    assert "main/gen-0001" in ids
    assert fingerprint(api, "main/gen-0000") == "main/gen-0000@0"  # the parent still answers by name
