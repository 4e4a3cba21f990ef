"""Chaos: the whole service under random faults, restarted as systemd's ``Restart=on-failure`` would.

For ``--minutes`` (30; ``--quick``: a few) a producer publishes at a steady ``--rate`` with a share of
hostile entries (each of the dead-letter reasons, plus an unknown lineage), while faults are injected one
at a time at random moments:

* ``kill_daemon``: SIGKILL of the daemon's whole process group (the driver, its local Ray, every actor);
* ``kill_learner`` / ``kill_ingest``: SIGKILL of that actor's worker process (its pid from ``/healthz``);
* ``redis_outage``: the bench's own redis-server stopped (SIGTERM or SIGKILL) for 5-30 s, then started again
  on its append-only file (``appendfsync always``: it comes back with its data);
* ``redis_during_startup``: the daemon killed, and Redis stopped before its next start-up (every other
  time) or a random 0-8 s into it;
* ``kill_learner_mid_reduction``: a ``reduce`` command, then the learner killed 0-3 s after it began.

A supervisor thread restarts the daemon ``--restart-sec`` after any exit that is not 0, exactly as
``Restart=on-failure``. After each fault the bench waits for recovery: ``/healthz`` with every part up and
a new checkpoint written (learning goes on). At the end it stops producing, waits until the consumer group
is drained, stops the daemon with SIGTERM and checks every published entry:

* lost: a good id neither learned nor held out (not in the lineage's ledger);
* learned twice: the checkpoint's counts (learned, held out, rolled back) against the ledger's distinct ids;
* every hostile entry in ``<stream>:dead`` with the reason it deserves; the registry loads.

Usage: ``python -m bench.chaos [--minutes 30 | --quick]``; writes bench/results/chaos.json and chaos.png
(chaos-quick.* with ``--quick``). ``tests/test_chaos.py`` runs a short one in ``make test``.
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
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import redis

from bench.common import free_port

STREAM, GROUP, CONTROL = "cascade:interactions", "cascade", "cascade:control"
FAULTS = ("kill_daemon", "kill_learner", "kill_ingest", "redis_outage", "redis_during_startup",
          "kill_learner_mid_reduction")
COLORS = ["red", "green", "blue", "amber"]
# Hostile entries: the fields and the reason each must be dead-lettered with. "{m}" is its marker.
HOSTILE = {
    "missing_field": {"prompt": "{m}"},
    "bad_reward": {"prompt": "{m}", "response": "r", "reward": "lots"},
    "bad_lineage": {"prompt": "{m}", "response": "r", "lineage": "../etc"},
    "not_utf8": {"prompt": "{m}", "response": b"\xff\xfe not utf-8"},
    "oversized": {"prompt": "{m}", "response": "x" * 70_000},
    "bad_meta": {"prompt": "{m}", "response": "r", "meta": "[1, 2]"},
    "empty_response": {"prompt": "{m}", "response": "   "},
    "unknown_field": {"prompt": "{m}", "response": "r", "colour": "red"},
    "unknown_lineage": {"prompt": "{m}", "response": "r", "lineage": "nosuchlineage"},
}


class RedisProcess:
    """The bench's own redis-server on a loopback port; append-only with fsync always, so a stop (even
    SIGKILL) and a start bring back every entry, group and pending list."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        r = redis.Redis(port=self.port)
        deadline = time.monotonic() + 30
        while True:
            try:
                r.ping()
                return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: see {self.dir / 'redis.log'}")
            time.sleep(0.05)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=30)


class Supervised:
    """``cascade run`` kept running as systemd's ``Restart=on-failure`` does: started again
    ``restart_sec`` after any exit but a clean one (0), a death by signal included."""

    def __init__(self, env: dict[str, str], logdir: Path, restart_sec: float) -> None:
        self.env, self.logdir, self.restart_sec = env, logdir, restart_sec
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.starts = 0
        self.exits: Counter = Counter()
        self._stopping = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
                self.starts += 1
                self.log = self.logdir / f"daemon-{self.starts:03d}.log"
                self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=self.env,
                                             stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                             start_new_session=True)
            code = self.proc.wait()
            self.exits[str(code)] += 1
            if code == 0 or self._stopping:
                return
            time.sleep(self.restart_sec)

    def start(self) -> "Supervised":
        self.thread.start()
        return self

    def kill(self) -> None:
        """SIGKILL the daemon's whole process group (what the supervisor sees as a failure)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self, timeout: float = 300) -> int | None:
        """SIGTERM, as ``systemctl stop``: no restart after it."""
        with self._lock:
            self._stopping = True
            proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        self.thread.join(timeout=30)
        return code


class Producer:
    """Publishes at a steady rate; an XADD that fails (Redis away) is retried with the same fields, so a
    good entry's ``id`` reaches the stream at least once (the daemon learns an id at most once)."""

    def __init__(self, url: str, rate: float, hostile: float, seed: int) -> None:
        self.r = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
        self.rate, self.hostile, self.rng = rate, hostile, random.Random(seed)
        self.good: list[str] = []
        self.bad: dict[str, str] = {}  # marker -> the reason it must be dead-lettered with
        self.retries = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="producer", daemon=True)

    def entry(self, n: int) -> tuple[dict, str | None, str | None]:
        if self.rng.random() < self.hostile:
            reason = self.rng.choice(sorted(HOSTILE))
            marker = f"hostile-{n}"
            return ({k: (v.format(m=marker) if isinstance(v, str) else v) for k, v in HOSTILE[reason].items()},
                    None, (marker, reason))
        i = len(self.good)
        gid = f"good-{i}"
        return ({"prompt": f"Item {i} has colour", "response": f" {COLORS[i % 4]} and weight {i % 7} kg.",
                 "id": gid, "meta": json.dumps({"domain": "catalog"})}, gid, None)

    def _loop(self) -> None:
        n, t_next = 0, time.monotonic()
        while not self._stop.is_set():
            fields, gid, bad = self.entry(n)
            while not self._stop.is_set():
                try:
                    self.r.xadd(STREAM, fields)
                    break
                except redis.RedisError:
                    self.retries += 1
                    time.sleep(0.2)
            else:
                return  # stopped while Redis was away: this entry never counted as published
            if gid:
                self.good.append(gid)
            else:
                self.bad[bad[0]] = bad[1]
            n += 1
            t_next = max(t_next + 1.0 / self.rate, time.monotonic() - 1.0)
            self._stop.wait(max(0.0, t_next - time.monotonic()))

    def start(self) -> "Producer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)


def healthz(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return json.loads(e.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def checkpoint_step(home: Path) -> int:
    try:
        return int(json.loads((home / "registry/main/live/state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


class Chaos:
    def __init__(self, work: Path, base_model: Path, minutes: float, rate: float, hostile: float, seed: int,
                 faults: list[str] | None, gap_s: tuple[float, float], outage_s: tuple[float, float],
                 restart_sec: float, recover_timeout_s: float) -> None:
        self.work, self.home = work, work / "home"
        self.rng = random.Random(seed)
        self.minutes, self.faults_plan = minutes, faults
        self.gap_s, self.outage_s, self.recover_timeout_s = gap_s, outage_s, recover_timeout_s
        self.redis = RedisProcess(work / "redis")
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.update({"CASCADE_HOME": str(self.home), "CASCADE_BASE_MODEL": str(base_model),
                    "CASCADE_REDIS_URL": self.redis.url, "CASCADE_METRICS_PORT": str(self.port),
                    "CASCADE_MAX_SEQ_LEN": "48", "CASCADE_BATCH_SIZE": "8", "CASCADE_WINDOW_STEPS": "1",
                    "CASCADE_LEARNING_RATE": "0.003", "CASCADE_REDUCE_EVERY": "0", "CASCADE_HEAL_STEPS": "4",
                    "CASCADE_REDUCE_BUDGET": "3.0", "CASCADE_CLAIM_IDLE_MS": "2000", "CASCADE_READ_BLOCK_MS": "200",
                    "CASCADE_STARTUP_TIMEOUT": "90", "CASCADE_SERVE": "off"})
        self.daemon = Supervised(env, work, restart_sec)
        self.producer = Producer(self.redis.url, rate, hostile, seed)
        self.records: list[dict] = []
        self.startup_faults = 0
        self.samples: list[tuple[float, int, int]] = []  # (seconds, backlog, checkpoint step)
        self.t0 = time.monotonic()

    # -- faults ------------------------------------------------------------------------------------
    def _pid(self, part: str, timeout: float = 120) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = healthz(self.port)
            p = (h or {}).get("parts", {}).get(part)
            if p and p["up"] and p.get("pid"):
                return int(p["pid"])
            time.sleep(0.3)
        return None

    def _kill_pid(self, pid: int | None) -> str:
        if pid is None:
            return "not up: nothing killed"
        try:
            os.kill(pid, signal.SIGKILL)
            return f"pid {pid} killed"
        except ProcessLookupError:
            return f"pid {pid} already gone"

    def _outage(self) -> str:
        kill = self.rng.random() < 0.5
        down = self.rng.uniform(*self.outage_s)
        self.redis.stop(kill=kill)
        time.sleep(down)
        self.redis.start()
        return f"redis {'SIGKILL' if kill else 'SIGTERM'}, down {down:.1f} s"

    def _log_text(self) -> str:
        return self.daemon.log.read_text(errors="replace") if self.daemon.log and self.daemon.log.exists() else ""

    def inject(self, fault: str) -> str:
        if fault == "kill_daemon":
            self.daemon.kill()
            return "process group SIGKILLed"
        if fault == "kill_learner":
            return self._kill_pid(self._pid("learner:main"))
        if fault == "kill_ingest":
            return self._kill_pid(self._pid("ingest"))
        if fault == "redis_outage":
            return self._outage()
        if fault == "redis_during_startup":
            # Every other time Redis is already away when the daemon starts again (its start-up waits for it);
            # otherwise it goes away 0-8 s into the start-up (while Ray starts, while the actors are made).
            self.startup_faults += 1
            before = self.startup_faults % 2 == 1
            starts = self.daemon.starts
            self.daemon.kill()
            if before:
                return "daemon killed, then before its restart: " + self._outage()
            deadline = time.monotonic() + 120
            while self.daemon.starts == starts and time.monotonic() < deadline:
                time.sleep(0.05)
            into = self.rng.uniform(0.0, 8.0)
            time.sleep(into)
            lines = [l for l in self._log_text().splitlines() if "cascade" in l]
            return f"daemon killed; {into:.1f} s into its restart ({lines[-1][9:90] if lines else 'no log yet'}): " \
                   + self._outage()
        if fault == "kill_learner_mid_reduction":
            pid = self._pid("learner:main")
            log = self.daemon.log
            offset = len(self._log_text())
            self.producer_r().xadd(CONTROL, {"command": "reduce", "lineage": "main"})
            deadline = time.monotonic() + 120
            while "reducing" not in self._log_text()[offset:]:
                if time.monotonic() > deadline or self.daemon.log != log:
                    return "the reduction did not start: " + self._kill_pid(pid)
                time.sleep(0.1)
            time.sleep(self.rng.uniform(0.0, 3.0))
            tail = self._log_text()[offset:]
            finished = "promoted" in tail or "reduction rejected" in tail
            return f"{'after' if finished else 'during'} the reduction: " + self._kill_pid(pid)
        raise ValueError(f"unknown fault {fault!r}")

    def producer_r(self) -> redis.Redis:
        return redis.Redis(port=self.redis.port)

    def all_up(self) -> bool:
        h = healthz(self.port)
        return bool(h and h.get("status") == "ok" and not h.get("down"))

    def recovered(self, step_at_fault: int) -> bool:
        """Every part up and learning going on: a checkpoint newer than the one at the fault."""
        return self.all_up() and checkpoint_step(self.home) > step_at_fault

    def _sample(self) -> None:
        try:
            from daemon.stream import group_info

            info = group_info(self.producer_r(), STREAM, GROUP)
            backlog = info.lag + info.pending
        except redis.RedisError:
            backlog = -1
        self.samples.append((round(time.monotonic() - self.t0, 1), backlog, checkpoint_step(self.home)))

    def wait(self, cond, timeout: float) -> float | None:
        """Seconds until ``cond()``, sampling the backlog meanwhile; None past ``timeout``."""
        t = time.monotonic()
        last = 0.0
        while not cond():
            if time.monotonic() - t > timeout:
                return None
            if time.monotonic() - last > 2:
                self._sample()
                last = time.monotonic()
            time.sleep(0.25)
        return time.monotonic() - t

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict:
        self.redis.start()
        self.daemon.start()
        first = self.wait(self.all_up, 600)
        if first is None:
            raise RuntimeError(f"the daemon did not start: see {self.work}")
        self.producer.start()
        end = self.t0 + self.minutes * 60
        plan = list(self.faults_plan or [])
        bag: list[str] = []
        while (plan if self.faults_plan else time.monotonic() < end):
            gap = self.rng.uniform(*self.gap_s)
            self.wait(lambda: False, gap)  # samples while it waits
            if self.faults_plan:
                fault = plan.pop(0)
            else:
                if not bag:  # every kind once per round, in random order
                    bag = self.rng.sample(FAULTS, len(FAULTS))
                fault = bag.pop()
            at = time.monotonic() - self.t0
            detail = self.inject(fault)
            injected = time.monotonic() - self.t0 - at  # e.g. Redis away that long
            step = checkpoint_step(self.home)
            took = self.wait(lambda: self.recovered(step), self.recover_timeout_s)
            self.records.append({"fault": fault, "at_s": round(at, 1), "injected_s": round(injected, 1),
                                 "detail": detail, "recovered": took is not None,
                                 "recover_s": None if took is None else round(took, 1)})
            print(f"[chaos {at:7.1f}s] {fault}: {detail}; "
                  f"{'recovered in %.1f s' % took if took is not None else 'NOT recovered'}", flush=True)
        self.producer.stop()
        drained = self.wait(self._drained, 900)
        code = self.daemon.stop()
        self.redis_after = self.producer_r()
        return self.report(drained is not None, code)

    def _drained(self) -> bool:
        from daemon.stream import group_info

        try:
            info = group_info(self.producer_r(), STREAM, GROUP)
        except redis.RedisError:
            return False
        return info.lag == 0 and info.pending == 0 and self.all_up()

    # -- the verdict -------------------------------------------------------------------------------
    def report(self, drained: bool, exit_code: int | None) -> dict:
        from learners._compat import ensure_torchvision_importable

        ensure_torchvision_importable()  # before bench.crash's check imports peft
        from bench.crash import registry_loads

        lineage = self.home / "registry" / "main"
        state = json.loads((lineage / "live" / "state.json").read_text())
        db = sqlite3.connect(lineage / "ledger.sqlite")
        ledger = dict(db.execute("SELECT id, outcome FROM seen").fetchall())
        by_outcome = Counter(ledger.values())
        r = self.redis_after
        dead: dict[str, set[str]] = {}
        good_dead = set()
        for _eid, f in r.xrange(f"{STREAM}:dead"):
            prompt = f.get(b"prompt", b"").decode("utf-8", "replace")
            dead.setdefault(prompt, set()).add(f[b"reason"].decode())
            if f.get(b"id", b"").decode().startswith("good-"):
                good_dead.add(f[b"id"].decode())
        good = set(self.producer.good)
        lost = sorted(good - set(ledger))
        counters = state["counters"]
        # The checkpoint's counts against the ledger's distinct ids, outcome by outcome: an id learned
        # twice would make the checkpoint count more than the ledger holds.
        learned_twice = (max(0, counters["interactions_learned"] - by_outcome["learned"])
                         + max(0, counters["heldout_seen"] - by_outcome["heldout"]))
        agree = (counters["interactions_learned"] == by_outcome["learned"]
                 and counters["heldout_seen"] == by_outcome["heldout"])
        hostile_missing = sorted(m for m in self.producer.bad if m not in dead)
        wrong_reason = sorted(m for m, want in self.producer.bad.items() if m in dead and want not in dead[m])
        recover = [x["recover_s"] for x in self.records if x["recovered"]]
        worst = max(self.records, key=lambda x: x["recover_s"] or 0, default=None)
        logs = "".join(p.read_text(errors="replace") for p in sorted(self.work.glob("daemon-*.log")))
        return {
            "minutes": round((time.monotonic() - self.t0) / 60, 1), "rate_per_s": self.producer.rate,
            "hostile_share": self.producer.hostile,
            "published_good": len(good), "published_hostile": len(self.producer.bad),
            "producer_retries": self.producer.retries,
            "faults_injected": len(self.records), "faults_by_kind": dict(Counter(x["fault"] for x in self.records)),
            "recoveries": len(recover), "not_recovered": len(self.records) - len(recover),
            "longest_recovery_s": max(recover, default=None),
            "longest_recovery_fault": worst["fault"] if worst else None,
            "median_recovery_s": sorted(recover)[len(recover) // 2] if recover else None,
            "daemon_starts": self.daemon.starts, "daemon_exits": dict(self.daemon.exits),
            "actor_restarts_by_ray": logs.count(" restarted by Ray"),
            "actors_created_again": logs.count(" created again (restart"),
            "startup_waits_logged": logs.count("could not reach Redis"),
            "lost": len(lost), "lost_ids": lost[:20], "learned_twice": learned_twice,
            "good_dead_lettered": len(good & good_dead),
            "learned": counters["interactions_learned"], "held_out": counters["heldout_seen"],
            "rolled_back": by_outcome["rolled_back"], "ledger_ids": len(ledger),
            "ledger_ids_not_published": len(set(ledger) - good),
            "ledger_and_checkpoint_agree": agree,
            "hostile_dead_lettered": len(self.producer.bad) - len(hostile_missing),
            "hostile_missing": hostile_missing[:20], "hostile_wrong_reason": wrong_reason[:20],
            "hostile_by_reason": dict(Counter(self.producer.bad.values())),
            "generation": (lineage / "CURRENT").read_text().strip(), "registry_loads": registry_loads(lineage),
            "drained": drained, "last_exit_code": exit_code,
            "faults": self.records, "samples": self.samples,
        }


def redis_server_version() -> str:
    words = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    return next((w[2:] for w in words if w.startswith("v=")), "?")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s[0] / 60 for s in res["samples"]]
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.plot(t, [s[1] if s[1] >= 0 else float("nan") for s in res["samples"]], lw=1, label="backlog (lag + pending)")
    colors = dict(zip(FAULTS, plt.cm.tab10.colors))
    for f in res["faults"]:  # the fault itself hatched, then the time to recover
        x, dx = f["at_s"] / 60, f.get("injected_s", 0) / 60
        ax.axvspan(x, x + dx, color=colors[f["fault"]], alpha=0.2, lw=0, hatch="//")
        ax.axvspan(x + dx, x + dx + (f["recover_s"] or 0) / 60, color=colors[f["fault"]], alpha=0.45, lw=0)
    for kind, c in colors.items():
        ax.plot([], [], color=c, lw=6, alpha=0.5, label=kind)
    ax.set_xlabel("minutes")
    ax.set_ylabel("entries")
    ax.set_title(f"chaos: {res['faults_injected']} faults, {res['recoveries']} recovered "
                 f"(longest {res['longest_recovery_s']} s), lost {res['lost']}, learned twice {res['learned_twice']}")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(base_model: Path, work: Path, minutes: float = 30, rate: float = 1.0, hostile: float = 0.1, seed: int = 0,
        faults: list[str] | None = None, gap_s=(20.0, 60.0), outage_s=(5.0, 30.0), restart_sec: float = 2.0,
        recover_timeout_s: float = 600) -> dict:
    chaos = Chaos(work, base_model, minutes, rate, hostile, seed, faults, gap_s, outage_s, restart_sec,
                  recover_timeout_s)
    try:
        return chaos.run()
    finally:
        chaos.producer.stop()
        if chaos.daemon.proc is not None and chaos.daemon.proc.poll() is None:
            chaos.daemon.stop(timeout=60)
        chaos.redis.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--quick", action="store_true", help="each fault once, short gaps and outages (a few minutes)")
    ap.add_argument("--rate", type=float, default=1.0, help="entries per second")
    ap.add_argument("--hostile", type=float, default=0.1, help="share of hostile entries")
    ap.add_argument("--restart-sec", type=float, default=2.0, help="the supervisor's RestartSec")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from bench.common import RESULTS, write_json
    from tests.tiny import build_tiny_llama, save_tokenizer

    work = Path(tempfile.mkdtemp(prefix="cascade-chaos-"))
    base = build_tiny_llama(work / "tiny", save_tokenizer(work / "tok"))
    if args.quick:
        res = run(base, work, rate=args.rate, hostile=args.hostile, seed=args.seed, restart_sec=args.restart_sec,
                  faults=random.Random(args.seed).sample(FAULTS, len(FAULTS)), gap_s=(3.0, 8.0), outage_s=(5.0, 8.0))
    else:
        res = run(base, work, args.minutes, args.rate, args.hostile, args.seed, restart_sec=args.restart_sec)
    res = {"redis_server": redis_server_version(), "learner_threads": os.cpu_count(), "work": str(work), **res}
    name = "chaos-quick" if args.quick else "chaos"
    write_json(f"{name}.json", res)  # with the provenance: commit, packages, device, threads
    plot(res, RESULTS / f"{name}.png")
    print(json.dumps({k: v for k, v in res.items() if k not in ("samples", "faults")}, indent=1))
    ok = (res["lost"] == 0 and res["learned_twice"] == 0 and res["not_recovered"] == 0 and res["registry_loads"]
          and not res["hostile_missing"] and not res["hostile_wrong_reason"] and res["good_dead_lettered"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
