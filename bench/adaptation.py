"""Rapid adaptation: steps to reach a target held-out loss on a new domain, by adapter initialization.

On the SmolLM2-135M foundation, three real domains (man pages, Python, Rust: what the existing
lineages' replay stores would hold) are the tasks; C, never seen while meta-learning, is the new
niche. Three starting adapters, then the same plain LoRA steps on C from each, evaluated on C's
held-out files every ``EVAL_EVERY`` steps:

* ``standard``: the usual LoRA initialization (B = 0: the foundation unchanged);
* ``reptile``: the meta-learned initialization (``learners.meta.reptile``, what ``CASCADE_META_INIT``
  uses), ``rounds x inner_steps`` steps over the three tasks;
* ``multitask``: the same number of steps of plain training on the three tasks mixed (is it the
  meta-learning, or only having seen related data?).

Targets: the loss ``standard`` reaches at the end of the budget, and 90% of its improvement;
reported as steps needed by each initialization and the ratio to ``standard``.

Usage: ``python -m bench.adaptation [--quick]``; writes bench/results/adaptation.json and .png.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, foundation, write_json

TASKS = ["man", "python", "rust"]
NEW = "c"
EVAL_EVERY = 2


def curve(base_model, tok, adapter, train, held, steps: int, cfg) -> list[float]:
    """Held-out loss after 0, EVAL_EVERY, 2*EVAL_EVERY, ... plain LoRA steps on ``train``."""
    from learners.update import ContinualLearner

    learner = ContinualLearner(base_model, tok, cfg, adapter_dir=adapter)
    rng = random.Random(0)
    out = [learner.evaluate(held)]
    for s in range(1, steps + 1):
        learner.step(rng.sample(train, cfg.batch_size))
        if s % EVAL_EVERY == 0:
            out.append(learner.evaluate(held))
    return out


def steps_to(losses: list[float], target: float) -> int | None:
    for i, v in enumerate(losses):
        if v <= target + 1e-9:
            return i * EVAL_EVERY
    return None


def multitask(base_model, tok, tasks, cfg, rc, out: Path) -> Path:
    from learners.update import ContinualLearner

    learner = ContinualLearner(base_model, tok, cfg)
    pool = [ex for v in tasks.values() for ex in v]
    rng = random.Random(0)
    for _ in range(rc.rounds * rc.inner_steps):
        learner.step(rng.sample(pool, rc.batch_size))
    learner.save(out)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in doc["curves"].items():
        ax.plot([i * EVAL_EVERY for i in range(len(c))], c, marker="o", ms=3, label=name)
    ax.axhline(doc["target_final"], ls="--", c="grey", lw=1, label="target: standard's final loss")
    ax.set_xlabel(f"LoRA steps on {NEW} (batch {doc['batch_size']})")
    ax.set_ylabel(f"held-out loss on {NEW} (nats/token)")
    ax.set_title("rapid adaptation on a domain unseen while meta-learning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from bench.continual import load_data
    from learners.meta import ReptileConfig, reptile
    from learners.update import UpdateConfig

    torch.set_num_threads(2)
    per_task, held_n, steps = (16, 8, 4) if args.quick else (64, 16, 24)
    rc = ReptileConfig(rounds=3 if args.quick else 24, inner_steps=2 if args.quick else 4, inner_lr=2e-3, batch_size=8)
    cfg = UpdateConfig(max_seq_len=128, batch_size=8, learning_rate=2e-3, constraints=frozenset())
    base_model = foundation()
    tok = AutoTokenizer.from_pretrained(str(base_model))
    train, held = load_data(per_task, held_n)
    from learners.data import Example

    tasks = {d: [Example(id=r["id"], prompt=r["prompt"], response=r["response"], domain=d) for r in train[d]]
             for d in TASKS}
    new_train = [Example(id=r["id"], prompt=r["prompt"], response=r["response"], domain=NEW) for r in train[NEW]]
    work = Path(tempfile.mkdtemp(prefix="cascade-adapt-"))
    doc = {"tasks": TASKS, "new_domain": NEW, "per_task": per_task, "heldout": held_n, "steps": steps,
           "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "reptile": vars(rc), "seconds": {}}
    inits = {"standard": None}
    t0 = time.monotonic()
    inits["reptile"] = reptile(base_model, tok, tasks, cfg, rc, work / "reptile",
                               progress=lambda i, n, d: print(f"reptile round {i}/{n} ({d})", flush=True))
    doc["seconds"]["reptile"] = time.monotonic() - t0
    t0 = time.monotonic()
    inits["multitask"] = multitask(base_model, tok, tasks, cfg, rc, work / "multitask")
    doc["seconds"]["multitask"] = time.monotonic() - t0
    doc["curves"] = {}
    for name, adapter in inits.items():
        doc["curves"][name] = curve(base_model, tok, adapter, new_train, held[NEW], steps, cfg)
        print(f"{name}: {[round(x, 3) for x in doc['curves'][name]]}", flush=True)
    std = doc["curves"]["standard"]
    doc["target_final"] = std[-1]
    doc["target_90"] = std[0] - 0.9 * (std[0] - std[-1])
    doc["steps_to_target"] = {}
    for which in ("target_final", "target_90"):
        row = {n: steps_to(c, doc[which]) for n, c in doc["curves"].items()}
        for n in ("reptile", "multitask"):  # None: never reached, or reached before any step (0 steps)
            row[f"speedup_{n}"] = row["standard"] / row[n] if row[n] else None
        doc["steps_to_target"][which] = row
    print(doc["steps_to_target"])
    name = "adaptation-quick" if args.quick else "adaptation"
    write_json(f"{name}.json", doc)
    plot(doc, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
