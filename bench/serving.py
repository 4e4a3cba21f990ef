"""Serving benchmark: the API (`cascade serve`, Ray Serve) against a bare ``model.generate`` loop on the same
SmolLM2 foundation, side by side in one run, greedy, 32 new tokens.

* one client after another vs bare batch 1 (target >= 0.9x the bare tokens/s);
* 8 concurrent clients vs one bare batch of 8 (target >= 0.8x); 1/4/16 clients: aggregate tokens/s,
  p50/p95 time to first token and latency;
* hot swap: a live checkpoint made durable under a steady load -> the first streamed token answered with its
  fingerprint (p95 <= 2 s; the first whole 32-token answer is recorded beside it), and requests failed while
  swapping (target 0);
* learning tokens/s (the LoRA update step) while the API serves a steady load, against learning alone.

``python -m bench.serving [--quick]`` writes bench/results/serving.json and serving.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import CACHE, RESULTS, foundation, free_port, write_json

NEW_TOKENS = 32
PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain how a hash table works.",
           "List some uses of the Python itertools module.", "Describe the water cycle to a child.",
           "What makes a good unit test?", "Give advice for a first marathon.",
           "Summarize the plot of a heist movie you invent.", "How do vaccines train the immune system?"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# -- the bare loop -------------------------------------------------------------------------------------
def bare(model, tok, prompts: list[str]) -> dict:
    import torch

    msgs = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]
    tok.padding_side = "left"
    enc = tok(msgs, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    tokens = 0
    for row in new.tolist():  # up to and including the first end-of-sequence token, as the API counts
        tokens += next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))
    return {"tokens": tokens, "seconds": seconds}


# -- API clients ---------------------------------------------------------------------------------------
def ask(base: str, prompt: str, model: str = "main") -> dict:
    """One streamed chat request: time to first token, latency, tokens, fingerprint (or error)."""
    import httpx

    t0 = time.perf_counter()
    ttft, fp, tokens = None, None, 0
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=300, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": NEW_TOKENS,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as resp:
            if resp.status_code != 200:
                return {"ok": False, "status": resp.status_code, "end": time.perf_counter()}
            for line in resp.iter_lines():
                if not line.startswith("data: {"):
                    continue
                doc = json.loads(line[6:])
                fp = doc.get("system_fingerprint", fp)
                if ttft is None and doc.get("choices"):
                    ttft = time.perf_counter() - t0
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"ok": False, "status": type(e).__name__, "end": time.perf_counter()}
    end = time.perf_counter()
    return {"ok": True, "ttft": ttft, "latency": end - t0, "tokens": tokens, "fingerprint": fp, "start": t0,
            "end": end}


def clients(base: str, n: int, rounds: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(rounds):
            res = ask(base, PROMPTS[(i + r) % len(PROMPTS)])
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    return {"clients": n, "requests": len(results), "failed": len(results) - len(ok), "seconds": wall,
            "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct([r["ttft"] for r in ok if r["ttft"]], 0.5),
            "ttft_p95": pct([r["ttft"] for r in ok if r["ttft"]], 0.95),
            "latency_p50": pct([r["latency"] for r in ok], 0.5), "latency_p95": pct([r["latency"] for r in ok], 0.95)}


class Load:
    """``n`` clients asking in a loop until stopped (the steady load of the swap and learning measurements)."""

    def __init__(self, base: str, n: int) -> None:
        self.base, self.results, self._stop = base, [], threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        while not self._stop.is_set():
            self.results.append(ask(self.base, PROMPTS[i % len(PROMPTS)]))

    def stop(self) -> list[dict]:
        self._stop.set()
        for t in self.threads:
            t.join()
        return self.results


# -- hot swap -----------------------------------------------------------------------------------------
def make_adapter(gen_dir: Path, dest: Path) -> None:
    """A LoRA adapter on the generation, as the learner saves one (B starts at zero: same answers)."""
    from peft import LoraConfig, get_peft_model

    from learners.config import LORA_TARGETS
    from learners.update import load_causal_lm

    model = get_peft_model(load_causal_lm(gen_dir), LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS,
                                                              task_type="CAUSAL_LM"))
    model.save_pretrained(str(dest))


def swaps(base: str, lineage_dir, adapter: Path, n: int) -> dict:
    """Swap ``n`` times under 2 clients asking in a loop: for each, seconds from the checkpoint becoming durable
    to the first token streamed with its fingerprint, and to the first whole answer with it."""
    from daemon.registry import atomic_write_json

    load = Load(base, 2)
    first_tokens, first_answers = [], []
    try:
        time.sleep(3)
        for k in range(1, n + 1):
            step = 1000 + k
            ckpt = lineage_dir.new_checkpoint_dir(step)
            for f in adapter.iterdir():
                shutil.copy(f, ckpt / f.name)
            atomic_write_json(ckpt / "state.json", {"lineage": "main", "base": "gen-0000", "step": step})
            lineage_dir.publish_live(ckpt)
            durable = time.perf_counter()
            want = f"main/gen-0000@{step}"
            while not any(r["ok"] and r["fingerprint"] == want for r in list(load.results)):
                if time.perf_counter() - durable > 120:
                    break
                time.sleep(0.02)
            new = [r for r in list(load.results) if r["ok"] and r["fingerprint"] == want]
            first_tokens.append(min((r["start"] + r["ttft"] - durable for r in new if r["ttft"]), default=None))
            first_answers.append(min((r["end"] - durable for r in new), default=None))
            time.sleep(2)
    finally:
        results = load.stop()
    tok = [t for t in first_tokens if t is not None]
    ans = [t for t in first_answers if t is not None]
    return {"swaps": n, "seconds": first_tokens, "p50": pct(tok, 0.5), "p95": pct(tok, 0.95),
            "answer_seconds": first_answers, "answer_p50": pct(ans, 0.5), "answer_p95": pct(ans, 0.95),
            "requests": len(results), "failed": sum(not r["ok"] for r in results)}


# -- learning while serving ---------------------------------------------------------------------------
def learning_rate_tokens(gen_dir: Path, steps: int, base: str | None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from learners.config import UpdateConfig
    from learners.data import Example
    from learners.update import ContinualLearner

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(str(gen_dir))
    learner = ContinualLearner(gen_dir, tok, UpdateConfig(batch_size=4, max_seq_len=128, replay_ratio=0.0,
                                                           constraints=frozenset({"clip"})))
    ex = [Example(id=f"b{i}", prompt=PROMPTS[i % 8], response=" ".join(PROMPTS) * 2) for i in range(4)]
    learner.step(ex)  # warm-up
    load = Load(base, 2) if base else None
    try:
        t0, tokens = time.perf_counter(), 0
        for _ in range(steps):
            tokens += learner.step(ex).tokens
        seconds = time.perf_counter() - t0
    finally:
        served = load.stop() if load else []
    return {"steps": steps, "tokens_per_s": tokens / seconds, "served_requests": len(served),
            "served_failed": sum(not r["ok"] for r in served)}


def start_api(home: Path, gen_dir: Path) -> tuple[subprocess.Popen, str]:
    from daemon.foundation import ensure_foundation
    from daemon.registry import Registry

    if home.exists():
        shutil.rmtree(home)
    ensure_foundation(Registry(home / "registry").lineage("main"), gen_dir)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update({"CASCADE_HOME": str(home), "CASCADE_SERVE_PORT": str(port), "CASCADE_METRICS_PORT": str(free_port()),
                "CASCADE_SERVE_CPUS": str(os.cpu_count()), "CASCADE_SERVE_MAX_BATCH": "16",
                "PYTHONPATH": str(RESULTS.parents[1])})
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "serve"], env=env, stdout=open(home / "serve.log", "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cascade serve exited: {(home / 'serve.log').read_text()[-2000:]}")
        if ask(base, "Hi")["ok"]:  # also loads the model in the replica
            return proc, base
        time.sleep(1)
    raise TimeoutError("cascade serve did not answer")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    labels = ["1 seq", "8 conc."]
    api = [doc["sequential"]["tokens_per_s"], doc["concurrency"]["8"]["tokens_per_s"]]
    bare_ = [doc["bare"]["batch1_tokens_per_s"], doc["bare"]["batch8_tokens_per_s"]]
    x = range(len(labels))
    a.bar([i - 0.2 for i in x], bare_, 0.4, label="bare model.generate")
    a.bar([i + 0.2 for i in x], api, 0.4, label="API (Ray Serve)")
    a.set_xticks(list(x), labels)
    a.set_ylabel("tokens/s")
    a.legend()
    a.set_title("throughput, greedy 32 tokens")
    cs = sorted(doc["concurrency"], key=int)
    b.plot([int(c) for c in cs], [doc["concurrency"][c]["tokens_per_s"] for c in cs], "o-", label="tokens/s")
    b.set_xlabel("concurrent clients")
    b.set_ylabel("aggregate tokens/s")
    b2 = b.twinx()
    b2.plot([int(c) for c in cs], [doc["concurrency"][c]["ttft_p95"] for c in cs], "s--", color="C3", label="TTFT p95")
    b2.set_ylabel("TTFT p95 (s)")
    b.set_title("the API under concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.serving")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    quick = args.quick
    import torch
    from transformers import AutoTokenizer

    from daemon.registry import Registry
    from learners.update import load_causal_lm

    torch.set_num_threads(os.cpu_count() or 1)
    gen_dir = foundation()
    home = CACHE / "serving-home"
    proc, base = start_api(home, gen_dir)
    doc: dict = {"quick": quick, "new_tokens": NEW_TOKENS}  # write_json adds the provenance
    try:
        model, tok = load_causal_lm(gen_dir).eval(), AutoTokenizer.from_pretrained(str(gen_dir))
        reps = 3 if quick else 8
        b1 = [bare(model, tok, [PROMPTS[i % 8]]) for i in range(reps)]
        b8 = [bare(model, tok, PROMPTS) for _ in range(1 if quick else 3)]
        doc["bare"] = {"batch1_tokens_per_s": sum(r["tokens"] for r in b1) / sum(r["seconds"] for r in b1),
                       "batch8_tokens_per_s": sum(r["tokens"] for r in b8) / sum(r["seconds"] for r in b8)}
        print("bare", doc["bare"], flush=True)
        doc["sequential"] = clients(base, 1, reps)
        doc["concurrency"] = {}
        for n in (1, 4, 8, 16):
            doc["concurrency"][str(n)] = clients(base, n, 1 if quick else 3)
            print(n, "clients", doc["concurrency"][str(n)], flush=True)
        doc["ratios"] = {"sequential_vs_batch1": doc["sequential"]["tokens_per_s"] / doc["bare"]["batch1_tokens_per_s"],
                         "concurrent8_vs_batch8": doc["concurrency"]["8"]["tokens_per_s"] / doc["bare"]["batch8_tokens_per_s"]}
        print("ratios", doc["ratios"], flush=True)
        del model
        adapter = CACHE / "serving-adapter"
        if not adapter.exists():
            make_adapter(gen_dir, adapter)
        doc["hot_swap"] = swaps(base, Registry(home / "registry").lineage("main"), adapter, 3 if quick else 10)
        print("hot swap", doc["hot_swap"], flush=True)
        steps = 2 if quick else 6
        doc["learning"] = {"alone": learning_rate_tokens(gen_dir, steps, None),
                           "while_serving": learning_rate_tokens(gen_dir, steps, base)}
        doc["learning"]["ratio"] = (doc["learning"]["while_serving"]["tokens_per_s"]
                                    / doc["learning"]["alone"]["tokens_per_s"])
        print("learning", doc["learning"], flush=True)
        doc["targets"] = {"sequential >= 0.9x": doc["ratios"]["sequential_vs_batch1"] >= 0.9,
                          "8 concurrent >= 0.8x": doc["ratios"]["concurrent8_vs_batch8"] >= 0.8,
                          "swap p95 <= 2 s": (doc["hot_swap"]["p95"] or 1e9) <= 2.0,
                          "no failed requests while swapping": doc["hot_swap"]["failed"] == 0}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    write_json("serving.json", doc)
    plot(doc, RESULTS / "serving.png")
    print(json.dumps(doc["targets"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
