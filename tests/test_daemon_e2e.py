"""The daemon as a user runs it: a subprocess, a real Redis, a real local Ray, a model on disk."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import redis
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.registry import Registry
from learners.data import Example
from learners.update import evaluate_loss
from tests.conftest import metric_value, settings_env, wait_drained

STREAM, GROUP = "cascade:interactions", "cascade"
COLORS = ["red", "green", "blue", "amber"]


def interaction(i: int) -> dict[str, str]:
    return {"prompt": f"Item {i} has colour", "response": f" {COLORS[i % 4]} and weight {i % 7} kg.",
            "meta": json.dumps({"domain": "catalog"})}


def live_and_base_loss(home, examples):
    lineage = Registry(home / "registry").lineage("main")
    gen = lineage.path / json.loads((lineage.live / "state.json").read_text())["base"]
    tok = AutoTokenizer.from_pretrained(gen)
    base = AutoModelForCausalLM.from_pretrained(gen, dtype=torch.float32)
    before = evaluate_loss(base, tok, examples, 48)
    live = PeftModel.from_pretrained(base, lineage.live)
    return before, evaluate_loss(live, tok, examples, 48)


def test_learn_reduce_and_observe(tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, calibration_items=48)
    r = redis.Redis.from_url(redis_url)
    # Entries published before the daemon starts are consumed.
    for i in range(40):
        r.xadd(STREAM, interaction(i))
    bad = [
        {"prompt": "no response here"},                                   # missing_field
        {"prompt": "p", "response": "r", "reward": "lots"},               # bad_reward
        {"prompt": "p", "response": "r", "lineage": "../etc"},            # bad_lineage
        {"prompt": "p", "response": b"\xff\xfe not utf-8"},               # not_utf8
        {"prompt": "p", "response": "x" * 70_000},                        # oversized
        {"prompt": "p", "response": "r", "meta": "[1, 2]"},               # bad_meta
        {"prompt": "p", "response": "   "},                               # empty_response
    ]
    bad_ids = [r.xadd(STREAM, f) for f in bad]
    d = daemon_factory(env)
    d.wait_healthy()
    for i in range(40, 80):
        r.xadd(STREAM, interaction(i))
    wait_drained(r, STREAM, GROUP, proc=d)

    dead = r.xrange(f"{STREAM}:dead")
    reasons = {e[1][b"source_id"].decode(): e[1][b"reason"].decode() for e in dead}
    assert reasons == {b.decode(): want for b, want in zip(bad_ids, [
        "missing_field", "bad_reward", "bad_lineage", "not_utf8", "oversized", "bad_meta", "empty_response"])}
    assert all(e[1][b"detail"] for e in dead)

    state = json.loads((home / "registry/main/live/state.json").read_text())
    examples = [Example(id=str(i), prompt=f["prompt"], response=f["response"])
                for i, f in ((i, interaction(i)) for i in range(80))]
    before, after = live_and_base_loss(home, examples)
    assert after < before - 0.3, (before, after)
    heldout = sum(len(v) for v in json.loads((home / "registry/main/live/heldout.json").read_text()).values())
    assert state["interactions_learned"] + heldout + state["deferred_waiting"] == 80

    m = d.metrics()
    assert metric_value(m, "cascade_interactions_received_total", lineage="main") == 80
    assert metric_value(m, "cascade_interactions_learned_total", lineage="main") == state["interactions_learned"]
    assert metric_value(m, "cascade_interactions_rejected_total") == 7
    assert metric_value(m, "cascade_interactions_rejected_total", reason="oversized") == 1
    assert metric_value(m, "cascade_update_steps_total", lineage="main") == state["update_steps"] > 0
    # Every interaction has one fate: learned, held out, waiting (deferred), set aside, replayed or duplicate.
    fate = {f: metric_value(m, "cascade_interactions_fate_total", 0.0, lineage="main", fate=f)
            for f in ("learned", "heldout", "deferred", "refused", "replayed", "duplicate", "skipped")}
    waiting = metric_value(m, "cascade_interactions_deferred", lineage="main")
    assert fate["learned"] == state["interactions_learned"] and fate["heldout"] == heldout
    assert fate["skipped"] == 0  # distinct content: curation (on by default) skips none of it
    assert (fate["learned"] + fate["heldout"] + waiting + fate["refused"] + fate["replayed"] + fate["duplicate"]
            + fate["skipped"]) == 80
    assert metric_value(m, "cascade_ingest_to_learn_seconds_count") >= 80
    assert metric_value(m, "cascade_model_parameters", lineage="main") > 0
    for name in ("cascade_stream_lag", "cascade_stream_pending", "cascade_train_loss", "cascade_replay_items",
                 "cascade_generation", "cascade_update_seconds_count", "cascade_forgetting"):
        metric_value(m, name)

    # Reduce on command, through the CLI and the control stream.
    out = subprocess.run([sys.executable, "-m", "daemon.cli", "reduce", "--lineage", "main"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not r.xlen("cascade:generations"):
        time.sleep(0.5)
    (eid, event), = r.xrange("cascade:generations")
    assert event[b"lineage"] == b"main" and event[b"generation"] == b"gen-0001"
    assert event[b"parent"] == b"main/gen-0000"
    assert (home / "registry/main/CURRENT").read_text().strip() == "gen-0001"
    gen0 = AutoModelForCausalLM.from_pretrained(home / "registry/main/gen-0000")
    gen1 = AutoModelForCausalLM.from_pretrained(home / "registry/main/gen-0001")
    AutoTokenizer.from_pretrained(home / "registry/main/gen-0001")
    assert gen1.num_parameters() < gen0.num_parameters()
    assert gen1.config.intermediate_size < gen0.config.intermediate_size
    card = json.loads((home / "registry/main/gen-0001/card.json").read_text())
    for key in ("lineage", "generation", "parent", "created_at", "n_params", "interactions_seen", "reduction", "eval"):
        assert key in card
    assert card["n_params"] == gen1.num_parameters() and card["generation"] == 1
    assert card["reduction"]["n_params_before"] > card["reduction"]["n_params_after"]
    # Importance and reconstruction use the last CASCADE_CALIBRATION_ITEMS; healing distils on everything learned.
    assert card["reduction"]["calibration_items"] == 48 < card["reduction"]["heal_items"] == state["interactions_learned"]
    first_try = card["reduction"]["gate"]["tries"][0]
    assert set(first_try["ppl_reconstructed"]) == set(first_try["ppl_healed"]) == set(first_try["ppl_pruned"])
    # Each least-squares step was kept exactly when it did not worsen the worst held-out ratio to the parent.
    before = card["reduction"]["gate"]["ppl_before"]
    worst = lambda ppl: max(ppl[d] / before[d] for d in before)  # noqa: E731
    assert first_try["refit_kept"] == (worst(first_try["ppl_refitted"]) <= worst(first_try["ppl_cut"]))
    assert first_try["reconstruction_kept"] == (worst(first_try["ppl_reconstructed"]) <= worst(first_try["ppl_pruned"]))
    assert set(first_try["ppl_cut"]) == set(first_try["ppl_pruned"])
    assert len(first_try["candidates"]) >= 2 and first_try["plan"] in first_try["candidates"]
    kept_layers = card["reduction"]["pruned"]["layers"][1]
    assert gen1.config.num_hidden_layers == kept_layers == first_try["layers"]
    assert json.loads(event[b"card"]) == card

    # The learner continues on gen-0001 with a fresh adapter.
    for i in range(80, 100):
        r.xadd(STREAM, interaction(i))
    wait_drained(r, STREAM, GROUP, proc=d)
    deadline = time.monotonic() + 30
    while json.loads((home / "registry/main/live/state.json").read_text())["base"] != "gen-0001":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    m = d.metrics()
    assert metric_value(m, "cascade_reductions_total", lineage="main", outcome="promoted") == 1
    assert metric_value(m, "cascade_generation", lineage="main") == 1
    assert metric_value(m, "cascade_model_parameters", lineage="main") == card["n_params"]
    assert metric_value(m, "cascade_reduction_seconds_count") == 1

    status = subprocess.run([sys.executable, "-m", "daemon.cli", "status", "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    doc = json.loads(status.stdout)
    assert doc["lag"] == 0 and doc["pending"] == 0
    assert doc["lineages"][0]["generation"] == "gen-0001"
    assert d.terminate() == 0


def test_sigterm_then_restart_loses_nothing_and_learns_nothing_twice(tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, window_steps=1)
    r = redis.Redis.from_url(redis_url)
    d = daemon_factory(env)
    d.wait_healthy()
    n = 200
    pipe = r.pipeline()
    for i in range(n):
        pipe.xadd(STREAM, {**interaction(i), "id": f"item-{i}"})
    pipe.execute()
    # Stop while it is learning: some windows are done, the rest must stay unacknowledged.
    deadline = time.monotonic() + 60
    while not (home / "registry/main/live").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert d.terminate() == 0
    from daemon.stream import group_info

    mid = group_info(r, STREAM, GROUP)
    state = json.loads((home / "registry/main/live/state.json").read_text())
    assert mid.pending + mid.lag > 0, "the daemon finished everything before the signal; nothing was tested"

    # Producers resend some ids: they must not be learned again.
    for i in range(10):
        r.xadd(STREAM, {**interaction(i), "id": f"item-{i}"})
    d2 = daemon_factory(env)
    d2.wait_healthy()
    wait_drained(r, STREAM, GROUP, proc=d2)
    state2 = json.loads((home / "registry/main/live/state.json").read_text())
    heldout = sum(len(v) for v in json.loads((home / "registry/main/live/heldout.json").read_text()).values())
    assert state2["interactions_learned"] >= state["interactions_learned"]
    assert state2["interactions_learned"] + heldout == n
    m = d2.metrics()
    assert metric_value(m, "cascade_interactions_duplicate_total", lineage="main") >= 10
    import sqlite3

    rows = sqlite3.connect(home / "registry/main/ledger.sqlite").execute("SELECT COUNT(*), COUNT(DISTINCT id) FROM seen").fetchone()
    assert rows == (n, n)
    assert d2.terminate() == 0


def test_lineages_are_routed_forked_on_demand_and_take_turns(tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, unknown_lineage="fork")
    r = redis.Redis.from_url(redis_url)
    d = daemon_factory(env)
    d.wait_healthy()
    for i in range(60):
        r.xadd(STREAM, {**interaction(i), "lineage": ["main", "law", "med"][i % 3]})
    wait_drained(r, STREAM, GROUP, proc=d)
    registry = Registry(home / "registry")
    assert registry.lineages() == ["law", "main", "med"]
    for name in ("law", "med"):
        card = registry.lineage(name).card("gen-0000")
        assert card["parent"] == "main/gen-0000" and card["lineage"] == name
    m = d.metrics()
    for name in ("main", "law", "med"):
        assert metric_value(m, "cascade_interactions_received_total", lineage=name) == 20
        state = json.loads((home / f"registry/{name}/live/state.json").read_text())
        heldout = sum(len(v) for v in json.loads((home / f"registry/{name}/live/heldout.json").read_text()).values())
        assert state["interactions_learned"] + heldout == 20
    assert d.terminate() == 0

    # With the default setting an unknown lineage is dead-lettered, and known ones still learn.
    d2 = daemon_factory(settings_env(home, tiny_model, redis_url))
    d2.wait_healthy()
    r.xadd(STREAM, {**interaction(100), "lineage": "unknown"})
    r.xadd(STREAM, {**interaction(101), "lineage": "law"})
    wait_drained(r, STREAM, GROUP, proc=d2)
    dead = [e[1] for e in r.xrange(f"{STREAM}:dead")]
    assert [x[b"reason"] for x in dead] == [b"unknown_lineage"] and dead[0][b"lineage"] == b"unknown"
    assert d2.terminate() == 0


def test_pause_holds_learning_and_resume_releases_it(tmp_path, tiny_model, redis_url, daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url)
    r = redis.Redis.from_url(redis_url)
    d = daemon_factory(env)
    d.wait_healthy()
    cli = [sys.executable, "-m", "daemon.cli"]
    assert subprocess.run(cli + ["pause"], env=env, capture_output=True, timeout=60).returncode == 0
    deadline = time.monotonic() + 60
    while metric_value(d.metrics(), "cascade_paused") != 1:
        assert time.monotonic() < deadline, "the daemon did not pause"
        time.sleep(0.2)
    # Paused, the daemon still reads and validates (received grows) but learns and acknowledges nothing. The
    # second batch is read by later rounds of the loop than the first: the first was held through them.
    for batch in (range(30), range(30, 60)):
        for i in batch:
            r.xadd(STREAM, interaction(i))
        deadline = time.monotonic() + 60
        while metric_value(d.metrics(), "cascade_interactions_received_total", 0.0, lineage="main") < batch[-1] + 1:
            assert time.monotonic() < deadline, "entries were not read while paused"
            time.sleep(0.2)
    m = d.metrics()
    for name in ("cascade_update_steps_total", "cascade_tokens_learned_total"):
        assert f'{name}{{lineage="main"}}' not in m  # no step yet: the labelled series does not exist
    assert r.xpending(STREAM, GROUP)["pending"] == 60
    assert subprocess.run(cli + ["resume"], env=env, capture_output=True, timeout=60).returncode == 0
    wait_drained(r, STREAM, GROUP, proc=d)
    m = d.metrics()
    assert metric_value(m, "cascade_paused") == 0
    assert metric_value(m, "cascade_update_steps_total", lineage="main") > 0
    learned = metric_value(m, "cascade_interactions_learned_total", lineage="main")
    assert learned > 0 and metric_value(m, "cascade_tokens_learned_total", lineage="main") > learned
    assert metric_value(m, "cascade_learning_phase", lineage="main", phase="full") == 1
    assert metric_value(m, "cascade_learning_knob", lineage="main", knob="learning_rate") == 0.003


def test_a_reduction_runs_beside_learning_and_a_killed_reducer_loses_nothing(tmp_path, tiny_model, redis_url,
                                                                            daemon_factory):
    """The reducer works on a snapshot in an actor of its own: kill -9 of its process while it reduces loses
    nothing, the lineage learns on meanwhile, and the reduction is made again from a new snapshot and promoted."""
    import os
    import signal

    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, calibration_items=32, heal_steps=200)  # a reduction of many seconds
    r = redis.Redis.from_url(redis_url)
    for i in range(40):
        r.xadd(STREAM, interaction(i))
    d = daemon_factory(env)
    d.wait_healthy()
    wait_drained(r, STREAM, GROUP, proc=d)
    learned_first = json.loads((home / "registry/main/live/state.json").read_text())["interactions_learned"]
    r.xadd("cascade:control", {"command": "reduce", "lineage": "main"})
    snapshots = home / "reductions" / "main"

    def reducing() -> int | None:  # the reducer's pid once it works on a snapshot that has no candidate yet
        pids = subprocess.run(["pgrep", "-s", str(d.proc.pid), "-f", "ray::ReducerActor"], capture_output=True,
                              text=True).stdout.split()
        taken = [p for p in snapshots.glob("*") if not p.name.startswith(".")] if snapshots.is_dir() else []
        return int(pids[0]) if pids and taken and not (taken[0] / "candidate").exists() else None

    deadline = time.monotonic() + 120
    while (pid := reducing()) is None:
        assert time.monotonic() < deadline, d.log.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # into the reduction
    assert not any((p / "candidate").exists() for p in snapshots.glob("*")), "the reduction ended before the kill"
    os.kill(pid, signal.SIGKILL)
    for i in range(40, 64):  # the lineage learns on while its reducer is dead, restarted and reducing again
        r.xadd(STREAM, interaction(i))
    wait_drained(r, STREAM, GROUP, proc=d)
    deadline = time.monotonic() + 300
    while not r.xlen("cascade:generations"):
        assert time.monotonic() < deadline and d.proc.poll() is None, d.log.read_text()[-3000:]
        time.sleep(0.5)
    (_, event), = r.xrange("cascade:generations")
    assert event[b"generation"] == b"gen-0001" and (home / "registry/main/CURRENT").read_text().strip() == "gen-0001"
    AutoModelForCausalLM.from_pretrained(home / "registry/main/gen-0001")
    m = d.metrics()
    assert metric_value(m, "cascade_reductions_total", lineage="main", outcome="failed") == 1
    assert metric_value(m, "cascade_reductions_total", lineage="main", outcome="promoted") == 1
    deadline = time.monotonic() + 60
    while (state := json.loads((home / "registry/main/live/state.json").read_text()))["base"] != "gen-0001":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    heldout = sum(len(v) for v in json.loads((home / "registry/main/live/heldout.json").read_text()).values())
    assert state["interactions_learned"] + heldout + state["deferred_waiting"] == 64  # nothing lost or counted twice
    assert state["reduction_pending"] is None and not any(snapshots.iterdir())
    # Learned while the reducer worked: after the snapshot, before the adoption (then relearned on gen-0001).
    card = json.loads((home / "registry/main/gen-0001/card.json").read_text())
    assert state["interactions_learned"] >= card["interactions_seen"] > learned_first
    assert card["reduction"]["snapshot"]["learner_step"] < state["step"]
