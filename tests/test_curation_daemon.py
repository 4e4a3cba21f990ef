"""Curation through the real daemon (a subprocess, a real Redis, a real local Ray, the tiny Llama): what is
skipped is acknowledged only once its decision is durable, counted, and copied to <stream>:skipped with its
reason, where ``cascade skipped --replay`` publishes it again; a kill -9 between the decision and the
acknowledgement loses no skip, and the restarted daemon keeps the near-duplicate index."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import redis

from daemon.stream import group_info
from tests.conftest import metric_value, settings_env, wait_drained
from tests.test_curation import EDITED, TEXT, sentence

STREAM, GROUP = "cascade:interactions", "cascade"
SKIPPED = f"{STREAM}:skipped"


def entry(ident: str, prompt: str, response: str, **meta) -> dict[str, str]:
    return {"id": ident, "prompt": prompt, "response": response, "meta": json.dumps(meta or {"domain": "docs"})}


def outcomes(home) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(home / "registry/main/ledger.sqlite") as db:
        return {i: (o, s) for i, s, o in db.execute("SELECT id, step, outcome FROM seen")}


def skipped_reasons(r: redis.Redis) -> dict[str, str]:
    return {f[b"id"].decode(): f[b"reason"].decode() for _, f in r.xrange(SKIPPED)}


def test_duplicates_junk_and_a_flood_are_skipped_with_reasons_acknowledged_and_replayable(
        tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, curation="exact,near,junk,fair", heldout_fraction=0)
    r = redis.Redis.from_url(redis_url)
    # Windows of 20 (5 new rows a step, 4 steps): each of the first three holds 4 docs and 16 from a crawler.
    pipe = r.pipeline()
    docs = [f" {TEXT}" if i == 1 else sentence(100 + i) for i in range(12)]
    for w in range(3):
        for i in range(4 * w, 4 * w + 4):
            pipe.xadd(STREAM, entry(f"doc-{i}", f"Doc {i}:", docs[i]))
        for i in range(16 * w, 16 * w + 16):
            pipe.xadd(STREAM, entry(f"spam-{i}", f"Offer {i}:", sentence(i), domain="spam", producer="crawler"))
    pipe.xadd(STREAM, entry("copy", "doc 0:", docs[0].upper()))  # the same content as doc-0, another id
    pipe.xadd(STREAM, entry("near", "Doc 1:", f" {EDITED}"))
    pipe.xadd(STREAM, entry("junk", "Doc 99:", "@@@@ ~~~~ " * 5))
    pipe.execute()
    d = daemon_factory(env)
    d.wait_healthy()
    wait_drained(r, STREAM, GROUP, proc=d)
    assert group_info(r, STREAM, GROUP).pending == 0

    reasons = skipped_reasons(r)
    assert {k: v for k, v in reasons.items() if not k.startswith("spam")} == {
        "copy": "exact_duplicate", "near": "near_duplicate", "junk": "junk"}
    assert sum(1 for k, v in reasons.items() if k.startswith("spam") and v == "flood") == 18  # 6 of 16 a window
    fields = {f[b"id"]: f for _, f in r.xrange(SKIPPED)}[b"near"]
    assert fields[b"response"].decode() == f" {EDITED}" and fields[b"lineage"] == b"main"
    assert fields[b"source_id"] and fields[b"detail"] and json.loads(fields[b"meta"]) == {"domain": "docs"}
    seen = outcomes(home)
    assert all(seen[f"doc-{i}"][0] == "learned" for i in range(12))  # the quiet source: all learned
    assert sum(1 for k, (o, _) in seen.items() if k.startswith("spam") and o == "learned") == 30

    m = d.metrics()
    for reason, n in (("exact_duplicate", 1), ("near_duplicate", 1), ("junk", 1), ("flood", 18), ("known", 0)):
        assert metric_value(m, "cascade_interactions_curated_total", lineage="main", reason=reason) == n
    assert metric_value(m, "cascade_interactions_fate_total", lineage="main", fate="skipped") == 21
    assert metric_value(m, "cascade_interactions_learned_total", lineage="main") == 42

    # The operator sees what was skipped and publishes the junk again: learned this time.
    cli = [sys.executable, "-m", "daemon.cli", "skipped"]
    listed = json.loads(subprocess.run(cli + ["--json"], env=env, capture_output=True, text=True, timeout=60).stdout)
    assert len(listed["entries"]) == 21
    out = subprocess.run(cli + ["--reason", "junk", "--replay"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    wait_drained(r, STREAM, GROUP, proc=d)
    assert outcomes(home)["replay-junk"][0] == "learned"
    status = subprocess.run([sys.executable, "-m", "daemon.cli", "status"], env=env, capture_output=True, text=True,
                            timeout=60).stdout
    assert "skipped 21" in status and "skipped 33%" in status  # 21 of the 64 interactions the lineage handled
    assert d.terminate() == 0


def test_a_kill_9_between_the_skip_and_its_acknowledgement_loses_nothing_and_the_index_survives(
        tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, heldout_fraction=0)  # curation as by default
    r = redis.Redis.from_url(redis_url)
    other = ("A learner owns its lineage directory and is the only process that writes there; every file is "
             "written to a temporary name, flushed to disk and renamed, so a crash at any instant leaves the "
             "previous state loadable, and the live link is switched only once the new checkpoint is whole.")
    d = daemon_factory(env)
    d.wait_healthy()
    for i in range(8):
        r.xadd(STREAM, entry(f"doc-{i}", f"Doc {i}:", f" {TEXT}" if i == 1 else f" {other}" if i == 2
                             else sentence(200 + i)))
    wait_drained(r, STREAM, GROUP, proc=d)

    # <stream>:skipped cannot be written (a key of another type): the skip is durable, its copy fails, the
    # entries stay pending while the driver retries; then the whole daemon is killed.
    r.set(SKIPPED, "not a stream")
    r.xadd(STREAM, entry("near", "Doc 1:", f" {EDITED}"))
    r.xadd(STREAM, entry("copy", "doc 3:", sentence(203).upper()))
    deadline = time.monotonic() + 120
    while True:
        seen = outcomes(home)
        step = json.loads((home / "registry/main/live/state.json").read_text())["step"]
        if all(seen.get(k, ("", 1 << 30))[0] == "skipped" and seen[k][1] <= step for k in ("near", "copy")):
            break
        assert time.monotonic() < deadline, f"the skips did not become durable: {seen}"
        time.sleep(0.2)
    retries = d.log.read_text().count("skipped interactions to")
    while d.log.read_text().count("skipped interactions to") < retries + 3:  # the driver retried the copy 3 times
        assert time.monotonic() < deadline, "the driver did not retry copying the skips"
        time.sleep(0.2)
    assert group_info(r, STREAM, GROUP).pending == 2, "a skip was acknowledged before it was copied"
    d.kill()  # SIGKILL of the daemon's process group: driver, Ray, actors
    r.delete(SKIPPED)

    d2 = daemon_factory(env)
    d2.wait_healthy()
    wait_drained(r, STREAM, GROUP, proc=d2)
    assert skipped_reasons(r) == {"near": "near_duplicate", "copy": "exact_duplicate"}
    assert metric_value(d2.metrics(), "cascade_interactions_duplicate_total", lineage="main") == 2
    # The restarted daemon's near-duplicate index is the one checkpointed before the kill.
    r.xadd(STREAM, entry("near-2", "Doc 2:", " " + other.replace("instant", "moment")))
    wait_drained(r, STREAM, GROUP, proc=d2)
    assert skipped_reasons(r)["near-2"] == "near_duplicate"
    assert outcomes(home)["near-2"][0] == "skipped"
    assert d2.terminate() == 0
