"""Throughput, freshness and memory: the daemon against the plainest alternative, side by side.

Five parts, each run on this machine in one invocation (``--parts`` picks some):

* ``learning``: interactions published to the stream and learned by the whole daemon (XADD ->
  learned -> acknowledged, timed from the first XADD to ``lag 0, pending 0``) against a bare PEFT
  LoRA loop written below: the same SmolLM2 foundation, adapter, batch size (new + replayed rows),
  sequence length, replay ratio, precision and torch threads; no Redis, no Ray, no gate, no
  checkpoints. The daemon runs twice: with the bare loop's own learning (replay only, gate off: what
  the machinery costs) and with its defaults (distillation, clipping and the held-out gate on: what
  the constraints cost on top). Both sides learn the same interactions in the same windows, and the
  benchmark asserts that they learn the same number of tokens.
* ``ingest``: entries validated and routed per second with learning paused (``pause`` on the
  control stream, ``CASCADE_MAX_BUFFERED`` raised so reading never waits), against
  ``redis-benchmark``'s pipelined XADD rate on the same Redis as the ceiling, for two
  ``CASCADE_READ_COUNT`` values.
* ``freshness``: p50/p95 seconds from XADD to acknowledgement with a producer at 50% and 90% of
  the learning capacity measured in ``learning`` (defaults), against the length of an update window.
* ``memory``: the resident memory of the daemon and every process it started (Ray, actors), sampled
  while a tiny Llama learns a steady stream for ``--memory-minutes``; the slope after warm-up.
* ``hardware``: the learner's choices measured in-process: fp32 against bf16 autocast for an update
  step and for evaluation, one torch thread against two, and the share of a step spent tokenizing
  and assembling the batch.

Usage: ``python -m bench.throughput [--quick] [--parts learning,ingest,freshness,memory,hardware]
[--memory-minutes 30]``; writes bench/results/throughput.json and throughput.png
(``throughput-quick.*`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from bench.common import RESULTS, Daemon, commit, foundation, free_port, run_line, write_json
from daemon.config import Settings

SEQ = 128
BATCH = 8
REPLAY_RATIO = 0.4
WINDOW_STEPS = 4
THREADS = 2
PARTS = ("learning", "ingest", "freshness", "memory", "hardware")


# -- talking to a running daemon ------------------------------------------------------------------
def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as ``{"name{label=value,...}": value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def healthz(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return {}


def wait_for(cond, what: str, timeout: float, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(every)


def start_daemon(home: Path, base_model: Path, **settings) -> tuple[Daemon, int]:
    port = free_port()
    d = Daemon(home, {"base_model": base_model, "metrics_port": port, "reduce_every": 0, **settings}, "daemon.log")
    wait_for(lambda: healthz(port).get("status") == "ok", "the daemon to be healthy", 300)
    return d, port


def records(n: int, offset: int = 0) -> list[dict]:
    """``n`` real interactions (Python source split into prompt/response), distinct ids."""
    from bench.continual import load_data

    train, _ = load_data(n + offset, 0)
    return [{**r, "id": f"tp-{i}"} for i, r in enumerate(train["python"])][offset:]


# -- learning: the daemon against a bare loop ----------------------------------------------------
def bare_loop(base_model: Path, warmup: list[dict], timed: list[dict], lr: float) -> dict:
    """The plainest alternative: a PEFT LoRA adapter, AdamW, batches of new rows plus replayed ones.

    Windows of ``WINDOW_STEPS`` steps, as the daemon's; a window's rows join the replay buffer after
    it, as the daemon's. Batches are assembled by ``learners.data.collate`` (the same tokens).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from learners.data import Example, collate
    from learners.update import LORA_TARGETS, load_causal_lm

    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    tok = AutoTokenizer.from_pretrained(str(base_model))
    model = get_peft_model(load_causal_lm(base_model),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                      task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    n_replay = round(BATCH * REPLAY_RATIO)
    new_per_step = BATCH - n_replay
    rng, replay = random.Random(0), []

    def learn(recs: list[dict]) -> tuple[int, int, int]:
        steps = learned = trained = 0
        examples = [Example(id=r["id"], prompt=r["prompt"], response=r["response"]) for r in recs]
        window = new_per_step * WINDOW_STEPS
        for w in range(0, len(examples), window):
            part = examples[w : w + window]
            for i in range(0, len(part), new_per_step):
                new = part[i : i + new_per_step]
                rows = new + rng.sample(replay, min(n_replay, len(replay)))
                batch = collate(tok, rows, SEQ)
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
                labels = batch.labels[:, 1:]  # each row's mean response NLL, then the mean over rows
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                        reduction="none")
                loss = (nll.sum(1) / (labels != -100).sum(1).clamp(min=1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                trained += batch.n_tokens
                learned += int((batch.labels[: len(new)] != -100).sum())
            replay.extend(part)
        return steps, learned, trained

    learn(warmup)
    t0 = time.perf_counter()
    steps, learned, trained = learn(timed)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "steps": steps, "interactions": len(timed), "learned_tokens": learned,
            "trained_tokens": trained, "tokens_per_s": learned / seconds, "interactions_per_s": len(timed) / seconds}


def daemon_learning(base_model: Path, home: Path, warmup: list[dict], timed: list[dict], settings: dict,
                    freshness: dict | None = None) -> dict:
    """The whole daemon learning ``timed`` after a warm-up window; optionally the freshness runs after."""
    d, port = start_daemon(home, base_model, **settings)
    try:
        d.publish(warmup)
        d.wait_drained()
        before = scrape(port)
        t0 = time.perf_counter()
        d.publish(timed)
        d.wait_drained(timeout=3600)
        seconds = time.perf_counter() - t0
        after = scrape(port)

        def delta(name: str) -> float:
            key = f"{name}{{lineage=main}}"
            return after.get(key, 0.0) - before.get(key, 0.0)

        learned = delta("cascade_tokens_learned_total")
        out = {"seconds": seconds, "steps": int(delta("cascade_update_steps_total")), "interactions": len(timed),
               "interactions_learned": int(delta("cascade_interactions_learned_total")),
               "learned_tokens": int(learned), "trained_tokens": int(delta("cascade_tokens_trained_total")),
               "tokens_per_s": learned / seconds, "interactions_per_s": len(timed) / seconds,
               "window_seconds": ((after["cascade_update_seconds_sum{}"] - before["cascade_update_seconds_sum{}"])
                                  / max(1.0, after["cascade_update_seconds_count{}"]
                                        - before["cascade_update_seconds_count{}"]))}
        if freshness is not None:
            out["freshness"] = {f"{int(share * 100)}%": steady_producer(d, share * out["interactions_per_s"], recs)
                                for share, recs in freshness.items()}
        return out
    finally:
        d.stop()


def steady_producer(d: Daemon, rate: float, recs: list[dict], stream: str = "cascade:interactions",
                    group: str = "cascade") -> dict:
    """Publish ``recs`` at ``rate`` per second; seconds from each XADD to its acknowledgement."""
    import redis

    # The daemon's socket, answers as str.
    pool = d.redis.connection_pool
    r = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class,
                                                         **{**pool.connection_kwargs, "decode_responses": True}))

    def order(entry_id: str) -> tuple[int, int]:
        ms, _, seq = entry_id.partition("-")
        return int(ms), int(seq or 0)
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        # An entry is acknowledged once the group has delivered past it and it is no longer pending.
        while not done.is_set():
            now = time.time()
            last = next(g["last-delivered-id"] for g in r.xinfo_groups(stream) if g["name"] == group)
            pending = {p["message_id"] for p in r.xpending_range(stream, group, "-", "+", 100_000)}
            for eid in [e for e in sent if e not in acked]:
                if order(eid) <= order(last) and eid not in pending:
                    acked[eid] = now
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t_next = time.time()
    for rec in recs:
        t_next += 1.0 / rate
        time.sleep(max(0.0, t_next - time.time()))
        fields = {"prompt": rec["prompt"], "response": rec["response"], "id": rec["id"]}
        eid = r.xadd(stream, fields)
        sent[eid] = time.time()
    wait_for(lambda: len(acked) == len(sent), "every entry to be acknowledged", 3600)
    done.set()
    watcher.join()
    lat = sorted(acked[e] - sent[e] for e in sent)
    return {"rate_per_s": rate, "entries": len(lat), "p50_s": _quantile(lat, 0.5), "p95_s": _quantile(lat, 0.95),
            "max_s": lat[-1]}


def _quantile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def part_learning(base_model: Path, work: Path, quick: bool, freshness_n: int) -> dict:
    n = 40 if quick else 200
    window = (BATCH - round(BATCH * REPLAY_RATIO)) * WINDOW_STEPS
    recs = records(window + n + 2 * freshness_n)
    warmup, timed, fresh = recs[:window], recs[window : window + n], recs[window + n :]
    lr = 2e-4
    common = {"max_seq_len": SEQ, "batch_size": BATCH, "replay_ratio": REPLAY_RATIO, "window_steps": WINDOW_STEPS,
              "learning_rate": lr, "precision": "fp32"}
    out = {"interactions": n, "settings": common}
    print("learning: bare loop", flush=True)
    out["bare"] = bare_loop(base_model, warmup, timed, lr)
    print(f"  {out['bare']}", flush=True)
    print("learning: daemon, the bare loop's learning (replay only, gate off)", flush=True)
    out["daemon_same_learning"] = daemon_learning(base_model, work / "same", warmup, timed,
                                                  # nothing held out: the held-out split stays with the gate
                                                  # off, and the bare loop learns every interaction
                                                  {**common, "constraints": "replay", "gate": "off",
                                                   "heldout_fraction": 0})
    print(f"  {out['daemon_same_learning']}", flush=True)
    print("learning: daemon, defaults (distill, clip, gate), then freshness", flush=True)
    shares = {0.5: fresh[:freshness_n], 0.9: fresh[freshness_n:]} if freshness_n else None
    out["daemon_defaults"] = daemon_learning(base_model, work / "defaults", warmup, timed, common, shares)
    print(f"  {out['daemon_defaults']}", flush=True)
    same = out["daemon_same_learning"]
    if same["learned_tokens"] != out["bare"]["learned_tokens"] or same["steps"] != out["bare"]["steps"]:
        raise AssertionError(f"the daemon and the bare loop did not learn the same: {same} vs {out['bare']}")
    out["ratio_same_learning"] = same["tokens_per_s"] / out["bare"]["tokens_per_s"]
    out["ratio_defaults"] = out["daemon_defaults"]["tokens_per_s"] / out["bare"]["tokens_per_s"]
    return out


# -- ingest ---------------------------------------------------------------------------------------
def redis_benchmark_xadd(sock: Path, n: int) -> float:
    """redis-benchmark's pipelined XADD rate (requests/s) on the daemon's own Redis."""
    out = subprocess.run(["redis-benchmark", "-s", str(sock), "-n", str(n), "-P", "32", "-q", "XADD",
                          "bench:xadd", "*", "prompt", "def f(x):", "response", " return x + 1"],
                         capture_output=True, text=True, timeout=600).stdout
    m = re.findall(r"([\d.]+) requests per second", out)
    if not m:
        raise RuntimeError(f"redis-benchmark printed no rate: {out!r}")
    return float(m[-1])


def part_ingest(tiny: Path, work: Path, quick: bool) -> dict:
    from daemon.embedded_redis import EmbeddedRedis

    n = 5_000 if quick else 50_000
    runs = {}
    default = Settings.model_fields["read_count"].default
    for read_count in (default, 2048):
        d, port = start_daemon(work / f"ingest-{read_count}", tiny, read_count=read_count, max_buffered=n + 1000)
        try:
            d.redis.xadd("cascade:control", {"command": "pause"})
            wait_for(lambda: healthz(port).get("paused") is True, "the pause to take effect", 60)
            recs = [{"prompt": f"Q{i}: what is {i} + 1?", "response": f" {i + 1}", "id": f"in-{i}"} for i in range(n)]
            t0 = time.perf_counter()
            for i in range(0, n, 1000):
                pipe = d.redis.pipeline(transaction=False)
                for rec in recs[i : i + 1000]:
                    pipe.xadd("cascade:interactions", rec)
                pipe.execute()
            published = time.perf_counter() - t0
            wait_for(lambda: scrape(port).get("cascade_interactions_received_total{lineage=main}", 0) >= n,
                     "every entry to be read", 600, every=0.1)
            seconds = time.perf_counter() - t0
            runs[str(read_count)] = {"entries": n, "seconds": seconds, "entries_per_s": n / seconds,
                                     "producer_seconds": published,
                                     "learned_while_paused": scrape(port).get(
                                         "cascade_interactions_learned_total{lineage=main}", 0)}
            if read_count == default:
                ceiling = redis_benchmark_xadd(EmbeddedRedis(d.home).socket, 20_000 if quick else 200_000)
        finally:
            d.stop()
        print(f"ingest read_count={read_count}: {runs[str(read_count)]}", flush=True)
    return {"runs": runs, "redis_benchmark_xadd_per_s": ceiling}


# -- memory ---------------------------------------------------------------------------------------
def session_rss(session: int) -> dict[str, int]:
    """Resident bytes of every process in the daemon's session, by role."""
    import psutil

    out = {"daemon": 0, "learner": 0, "ingest": 0, "ray": 0}
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        try:
            if os.getsid(p.pid) != session or p.info["memory_info"] is None:
                continue
        except OSError:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        role = ("daemon" if p.pid == session else "learner" if "LearnerActor" in cmd
                else "ingest" if "IngestActor" in cmd else "ray")
        out[role] += p.info["memory_info"].rss
    return out


def part_memory(tiny: Path, work: Path, minutes: float) -> dict:
    # One core for the learner (CASCADE_LEARNER_CPUS=1), so the soak can share the machine with another run.
    d, port = start_daemon(work / "memory", tiny, max_seq_len=64, replay_capacity=2000, learner_cpus=1)
    samples, sent = [], 0
    t0 = time.monotonic()
    try:
        next_sample = 0.0
        while (now := time.monotonic() - t0) < minutes * 60:
            info = d.redis.xinfo_groups("cascade:interactions") if sent else []
            backlog = sum(int(g.get("lag") or 0) + int(g["pending"]) for g in info)
            if backlog < 256:
                pipe = d.redis.pipeline(transaction=False)
                for _ in range(64):
                    i = sent
                    pipe.xadd("cascade:interactions", {"prompt": f"Item {i} weighs", "response": f" {i % 97} kg, "
                                                       f"colour {['red', 'blue', 'green'][i % 3]}.", "id": f"m-{i}"})
                    sent += 1
                pipe.execute()
            if now >= next_sample:
                m = scrape(port)
                samples.append({"t": now, **session_rss(d.proc.pid),
                                "learned": m.get("cascade_interactions_learned_total{lineage=main}", 0)})
                next_sample = now + (5 if minutes < 5 else 15)
            time.sleep(0.2)
    finally:
        d.stop()
    total = [sum(s[k] for k in ("daemon", "learner", "ingest", "ray")) for s in samples]
    warm = len(samples) // 5  # the first fifth is warm-up
    ts, ys = [s["t"] for s in samples[warm:]], total[warm:]
    slope = _slope(ts, ys)
    mean = sum(ys) / len(ys)
    return {"minutes": minutes, "published": sent, "learned": samples[-1]["learned"], "samples": samples,
            "rss_total_mb_after_warmup": {"min": min(ys) / 2**20, "max": max(ys) / 2**20, "mean": mean / 2**20},
            "slope_mb_per_hour": slope * 3600 / 2**20,
            "growth_after_warmup": slope * (ts[-1] - ts[0]) / mean,
            "spread_after_warmup": (max(ys) - min(ys)) / mean}


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


# -- hardware choices -----------------------------------------------------------------------------
def part_hardware(base_model: Path, quick: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    from learners.data import Example, collate, encode
    from learners.update import ALL_CONSTRAINTS, ContinualLearner, UpdateConfig

    tok = AutoTokenizer.from_pretrained(str(base_model))
    recs = records(64)
    exs = [Example(id=r["id"], prompt=r["prompt"], response=r["response"]) for r in recs]
    n = 3 if quick else 8
    out = {}
    for name, threads, bf16 in (("fp32, 2 threads", 2, False), ("bf16, 2 threads", 2, True),
                                ("fp32, 1 thread", 1, False)):
        torch.set_num_threads(threads)
        learner = ContinualLearner(base_model, tok, UpdateConfig(max_seq_len=SEQ, batch_size=BATCH, bf16=bf16,
                                                                    constraints=ALL_CONSTRAINTS, replay_weight=1.0))
        learner.step(exs[:5], exs[5:8])  # warm-up
        t0 = time.perf_counter()
        for i in range(n):
            learner.step(exs[8 + 5 * i : 13 + 5 * i], exs[:3])
        step = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        learner.evaluate(exs[:32])
        ev = time.perf_counter() - t0
        out[name] = {"step_s": step, "eval_32_s": ev}
        print(f"hardware {name}: {out[name]}", flush=True)
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    for i in range(n):
        collate(tok, exs[8 + 5 * i : 13 + 5 * i] + exs[:3], SEQ)
    collate_s = (time.perf_counter() - t0) / n
    base = out["fp32, 2 threads"]
    lengths = [len(encode(tok, ex, SEQ)[0]) for ex in exs]
    return {"configs": out, "padding_share": {"arrival_order": _padding(lengths, False),
                                              "sorted_within_window": _padding(lengths, True)}, "bf16_step_speedup": base["step_s"] / out["bf16, 2 threads"]["step_s"],
            "bf16_eval_speedup": base["eval_32_s"] / out["bf16, 2 threads"]["eval_32_s"],
            "two_threads_speedup": out["fp32, 1 thread"]["step_s"] / base["step_s"],
            "collate_s": collate_s, "collate_share_of_step": collate_s / base["step_s"]}


def _padding(lengths: list[int], sort: bool) -> float:
    """Share of padded positions when windows of new rows are cut into batches of new rows."""
    new_per_step = BATCH - round(BATCH * REPLAY_RATIO)
    window = new_per_step * WINDOW_STEPS
    real = padded = 0
    for w in range(0, len(lengths), window):
        rows = sorted(lengths[w : w + window]) if sort else lengths[w : w + window]
        for i in range(0, len(rows), new_per_step):
            b = rows[i : i + new_per_step]
            real += sum(b)
            padded += max(b) * len(b)
    return 1 - real / padded


# -- report ---------------------------------------------------------------------------------------
def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in ("learning", "memory") if p in doc]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels):
        if p == "learning":
            L = doc["learning"]
            names = ["bare loop", "daemon (same learning)", "daemon (defaults)"]
            vals = [L["bare"]["tokens_per_s"], L["daemon_same_learning"]["tokens_per_s"],
                    L["daemon_defaults"]["tokens_per_s"]]
            ax.bar(names, vals, color=["grey", "tab:blue", "tab:orange"])
            ax.set_ylabel("tokens learned / s")
            ax.set_title("learning throughput, SmolLM2-135M, CPU")
        else:
            S = doc["memory"]["samples"]
            for role in ("daemon", "learner", "ingest", "ray"):
                ax.plot([s["t"] / 60 for s in S], [s[role] / 2**20 for s in S], label=role)
            ax.plot([s["t"] / 60 for s in S], [sum(s[r] for r in ("daemon", "learner", "ingest", "ray")) / 2**20
                                               for s in S], label="total", color="black")
            ax.set_xlabel("minutes")
            ax.set_ylabel("RSS (MiB)")
            ax.set_title(f"memory, tiny Llama, {int(doc['memory']['learned'])} interactions learned")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(doc: dict) -> str:
    lines = []
    if "learning" in doc:
        L = doc["learning"]
        lines += ["| run | interactions | steps | tokens learned | seconds | tokens/s | vs bare loop |",
                  "|---|---|---|---|---|---|---|"]
        for key, name in (("bare", "bare PEFT loop"), ("daemon_same_learning", "daemon, same learning (replay, gate off)"),
                          ("daemon_defaults", "daemon, defaults (replay, distill, clip, gate)")):
            r = L[key]
            ratio = r["tokens_per_s"] / L["bare"]["tokens_per_s"]
            lines.append(f"| {name} | {r['interactions']} | {r['steps']} | {r['learned_tokens']} | "
                         f"{r['seconds']:.1f} | {r['tokens_per_s']:.1f} | {ratio:.2f}x |")
        for share, f in L["daemon_defaults"].get("freshness", {}).items():
            lines.append(f"\nfreshness at {share} of capacity ({f['rate_per_s']:.2f}/s): p50 {f['p50_s']:.1f} s, "
                         f"p95 {f['p95_s']:.1f} s, one update window {L['daemon_defaults']['window_seconds']:.1f} s")
    if "ingest" in doc:
        I = doc["ingest"]
        lines.append(f"\ningest (learning paused): " + ", ".join(
            f"read_count {k}: {v['entries_per_s']:,.0f} entries/s" for k, v in I["runs"].items())
            + f"; redis-benchmark XADD (-P 32): {I['redis_benchmark_xadd_per_s']:,.0f}/s")
    if "memory" in doc:
        M = doc["memory"]
        r = M["rss_total_mb_after_warmup"]
        lines.append(f"\nmemory over {M['minutes']:g} min ({int(M['learned'])} learned): RSS {r['min']:.0f}-"
                     f"{r['max']:.0f} MiB after warm-up, slope {M['slope_mb_per_hour']:+.1f} MiB/h, "
                     f"growth {100 * M['growth_after_warmup']:+.1f}%")
    if "hardware" in doc:
        H = doc["hardware"]
        lines.append("\n| learner choice | step (s) | eval of 32 (s) |\n|---|---|---|")
        for name, v in H["configs"].items():
            lines.append(f"| {name} | {v['step_s']:.3f} | {v['eval_32_s']:.3f} |")
        lines.append(f"\nbf16: step {H['bf16_step_speedup']:.2f}x, eval {H['bf16_eval_speedup']:.2f}x; two threads "
                     f"{H['two_threads_speedup']:.2f}x one; batch assembly {100 * H['collate_share_of_step']:.1f}% of "
                     f"a step; padding {100 * H['padding_share']['arrival_order']:.1f}% of positions in arrival "
                     f"order, {100 * H['padding_share']['sorted_within_window']:.1f}% sorted by length within a window")
    return "\n".join(lines + ["", run_line(doc)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run of every part")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--memory-minutes", type=float, default=30.0)
    ap.add_argument("--table", metavar="JSON", help="only print the README summary of an earlier run")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    import tempfile

    import torch

    from tests.tiny import build_tiny_llama, save_tokenizer

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        ap.error(f"unknown parts: {sorted(unknown)}")
    work = Path(tempfile.mkdtemp(prefix="cascade-throughput-"))
    base_model = foundation()
    tiny = build_tiny_llama(work / "tiny", save_tokenizer(work / "tok"))
    suffix = "-quick" if args.quick else ""
    name = f"throughput{suffix}.json"
    doc = json.loads((RESULTS / name).read_text()) if (RESULTS / name).exists() else {}
    doc.update({"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__})
    for part in parts:
        t0 = time.monotonic()
        if part == "learning":
            doc["learning"] = part_learning(base_model, work, args.quick,
                                            0 if "freshness" not in parts else (10 if args.quick else 60))
        elif part == "ingest":
            doc["ingest"] = part_ingest(tiny, work, args.quick)
        elif part == "memory":
            doc["memory"] = part_memory(tiny, work, 1.0 if args.quick else args.memory_minutes)
        elif part == "hardware":
            doc["hardware"] = part_hardware(base_model, args.quick)
        else:
            continue  # freshness runs inside learning, on the defaults daemon
        doc[part]["part_seconds"] = time.monotonic() - t0
        doc[part].update(commit())  # parts of earlier runs kept beside it carry their own commit
        write_json(name, doc)
        plot(doc, RESULTS / f"throughput{suffix}.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
