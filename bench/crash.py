"""Crash anywhere: ``kill -9`` of the daemon and everything it started, at random moments, then restart.

Each cycle starts ``cascade run`` (a tiny Llama, a real Redis), publishes interactions with ids (some
of them re-sent), in a third of the cycles SIGKILLs the learner actor's process alone and waits for
learning to resume (Ray restarts it from its checkpoint), in another third asks for a reduction,
waits a random time and kills the daemon's whole process group with SIGKILL (the daemon, its local Ray and the actors: a machine losing power, as far
as one process tree can). The phase it was in is read from the last line of its log. After the last
kill a daemon is started once more and left to drain the stream. Then, for every id ever published:

* lost: neither learned, nor held out, nor dead-lettered;
* duplicated: learned more times than once (``interactions_learned`` + held-out items against the
  distinct ids the ledger holds);
* the registry loads (``CURRENT`` names a generation that ``from_pretrained`` loads, ``live/`` loads).

Usage: ``python -m bench.crash [--kills 20 | --quick] [--redis-url redis://127.0.0.1:6379/15]``; writes
bench/results/crash.json (crash-quick.json with ``--quick``). ``tests/test_crash.py`` runs a few cycles of the same in ``make test``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

STREAM, GROUP = "cascade:interactions", "cascade"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _phase(log: Path) -> str:
    """What the daemon was doing when it died, from the last line of its log."""
    lines = [l for l in log.read_text(errors="replace").splitlines() if "cascade" in l or "lineage" in l]
    last = lines[-1] if lines else ""
    for word, phase in (("healing", "mid-reduction (healing)"), ("allocations", "mid-reduction (pruning)"),
                        ("reducing", "mid-reduction (merge/score)"), ("promoted", "after a promotion"),
                        ("keep", "mid-reduction (gate)"), ("started", "starting"), ("learn", "learning")):
        if word in last:
            return phase
    return "ingest/learning"


def _learner_pids(session: int) -> list[int]:
    """The learner actors' worker processes among the daemon's (Ray names them ``ray::LearnerActor``)."""
    out = subprocess.run(["pgrep", "-s", str(session), "-f", "ray::LearnerActor"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def run(base_model: Path, home: Path, redis_url: str, kills: int, seed: int = 0, per_cycle: int = 24) -> dict:
    import redis

    from bench.common import free_port
    from daemon.stream import group_info

    rng = random.Random(seed)
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update({"CASCADE_HOME": str(home), "CASCADE_BASE_MODEL": str(base_model), "CASCADE_REDIS_URL": redis_url,
                "CASCADE_MAX_SEQ_LEN": "48", "CASCADE_BATCH_SIZE": "8", "CASCADE_WINDOW_STEPS": "1",
                "CASCADE_LEARNING_RATE": "0.003", "CASCADE_REDUCE_EVERY": "0", "CASCADE_HEAL_STEPS": "20",
                "CASCADE_REDUCE_BUDGET": "3.0", "CASCADE_CLAIM_IDLE_MS": "1000", "CASCADE_READ_BLOCK_MS": "200", "CASCADE_SERVE": "off"})
    published: list[str] = []
    phases: Counter = Counter()
    unfinished: list[int] = []
    learner_kills = 0

    def start(n: int):
        env["CASCADE_METRICS_PORT"] = str(free_port())
        log = home.parent / f"daemon-{n}.log"
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=env, stdout=open(log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not _healthy(int(env["CASCADE_METRICS_PORT"])):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: see {log}")
            time.sleep(0.3)
        return proc, log

    def publish(count: int) -> int:
        """Adds ``count`` new interactions and re-sends up to 3 earlier ids; returns the entries added."""
        pipe = r.pipeline()
        for _ in range(count):
            i = len(published)
            published.append(f"item-{i}")
            pipe.xadd(STREAM, {"prompt": f"Item {i} has colour", "response": f" {['red', 'blue'][i % 2]}, {i % 7} kg.",
                               "id": f"item-{i}"})
        resent = rng.sample(published, min(3, len(published)))  # producers re-send a few
        for old in resent:  # the same fields again (different content under an old id would, with the
            i = int(old.split("-")[1])  # original still pending after a kill, make two ids share one text)
            pipe.xadd(STREAM, {"prompt": f"Item {i} has colour", "response": f" {['red', 'blue'][i % 2]}, {i % 7} kg.",
                               "id": old})
        pipe.execute()
        return count + len(resent)

    def publish_and_wait_for_learning(count: int, what: str) -> None:
        """Publish, then wait until some of what was just published is acknowledged (learning is on)."""
        before = backlog()
        added = publish(count)
        wait_until(lambda: backlog() < before + added, what, timeout=300)

    def backlog() -> int:
        info = group_info(r, STREAM, GROUP)
        return info.lag + info.pending

    def wait_until(cond, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.1)

    for k in range(kills):
        proc, log = start(k)
        first = per_cycle // 2 if k % 3 == 1 else per_cycle
        publish_and_wait_for_learning(first, "the first acknowledgement of this cycle")
        if k % 3 == 1:  # a learner actor dies alone first: Ray restarts it from its checkpoint
            learner = _learner_pids(proc.pid)
            if learner:
                time.sleep(rng.uniform(0.0, 2.0))
                os.kill(learner[0], signal.SIGKILL)
                learner_kills += 1
            publish_and_wait_for_learning(per_cycle - first, "learning to resume after the learner's death")
        if k % 3 == 2:  # a third of the cycles die during a reduction
            r.xadd("cascade:control", {"command": "reduce", "lineage": "main"})
            wait_until(lambda: "reducing" in log.read_text(errors="replace"), "the reduction to start")
            time.sleep(rng.uniform(0.0, 10.0))
        else:  # more work arrives just before the kill, so that a fast machine is not always done by then;
            publish(per_cycle // 2)  # the first cycle's kill follows at once: at least one kill interrupts work
            time.sleep(0.0 if k == 0 else rng.uniform(0.0, 1.0))
        phases[_phase(log)] += 1
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        info = group_info(r, STREAM, GROUP)
        unfinished.append(info.lag + info.pending)  # work the kill interrupted

    proc, log = start(kills)
    deadline = time.monotonic() + 900
    while True:
        info = group_info(r, STREAM, GROUP)
        if info.lag == 0 and info.pending == 0:
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the last daemon did not drain the stream: see {log}")
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    clean_exit = proc.wait(timeout=300) == 0

    lineage = home / "registry" / "main"
    state = json.loads((lineage / "live" / "state.json").read_text())
    heldout = sum(len(v) for v in json.loads((lineage / "live" / "heldout.json").read_text()).values())
    ledger = {row[0] for row in sqlite3.connect(lineage / "ledger.sqlite").execute("SELECT id FROM seen")}
    dead = {e[1].get(b"id", b"").decode() for e in r.xrange(f"{STREAM}:dead")}
    ids = set(published)
    lost = sorted(ids - ledger - dead)
    learned_or_held = state["interactions_learned"] + heldout
    return {"kills": kills, "learner_actor_kills": learner_kills, "kill_phases": dict(phases), "unfinished_entries_at_each_kill": unfinished,
            "published_ids": len(ids),
            "learned": state["interactions_learned"], "held_out": heldout, "dead_lettered": len(ids & dead),
            "lost": len(lost), "lost_ids": lost[:20], "duplicated": learned_or_held - len(ledger & ids),
            "generation": (lineage / "CURRENT").read_text().strip(), "registry_loads": registry_loads(lineage),
            "last_exit_clean": clean_exit}


def registry_loads(lineage: Path) -> bool:
    from peft import PeftModel

    from learners.update import load_causal_lm

    gen = lineage / (lineage / "CURRENT").read_text().strip()
    PeftModel.from_pretrained(load_causal_lm(gen), str(lineage / "live"))
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 kills, written to crash-quick.json")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from bench.common import write_json
    from tests.tiny import build_tiny_llama, save_tokenizer

    work = Path(tempfile.mkdtemp(prefix="cascade-crash-"))
    base = build_tiny_llama(work / "tiny", save_tokenizer(work / "tok"))
    t0 = time.monotonic()
    res = run(base, work / "home", args.redis_url, 3 if args.quick else args.kills, args.seed)
    res["seconds"] = time.monotonic() - t0
    write_json("crash-quick.json" if args.quick else "crash.json", res)
    print(json.dumps(res, indent=1))
    return 0 if res["lost"] == 0 and res["duplicated"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
