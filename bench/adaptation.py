"""Rapid adaptation: steps to reach a target held-out loss on a new domain, by adapter initialization.

On the SmolLM2-135M foundation, three real domains (man pages, Python, Rust: what the existing
lineages' replay stores would hold) are the tasks; a domain never seen while meta-learning (``--new``:
Perl modules by default, C headers in the first published run) is the new niche. Three starting
adapters, then the same plain LoRA steps on it from each, evaluated on its held-out files every
``--eval-every`` steps:

* ``standard``: the usual LoRA initialization (B = 0: the foundation unchanged);
* ``reptile``: the meta-learned initialization (``learners.meta.reptile``, what ``CASCADE_META_INIT``
  uses), ``rounds x inner_steps`` steps over the three tasks;
* ``multitask``: the same number of steps of plain training on the three tasks mixed (is it the
  meta-learning, or only having seen related data?).

Targets: the lowest held-out loss ``standard`` reaches within the budget (on 64 items every start
overfits before the budget ends, so its final loss would be a target set by overfitting), and 90% of
that improvement; reported as steps needed by each initialization and the ratio to ``standard``.

Usage: ``python -m bench.adaptation [--quick] [--new perl] [--lr 1e-3] [--eval-every 1]``; writes
bench/results/adaptation.json and .png.
"""
from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, foundation, write_json

TASKS = ["man", "python", "rust"]


def curve(base_model, tok, adapter, train, held, steps: int, cfg, every: int, seed: int = 0) -> list[float]:
    """Held-out loss after 0, every, 2*every, ... plain LoRA steps on ``train``."""
    return adapt(base_model, tok, adapter, train, held, steps, cfg, every, seed)[0]


def adapt(base_model, tok, adapter, train, held, steps: int, cfg, every: int, seed: int = 0):
    """:func:`curve`, and the learner it leaves (to measure what else it still knows)."""
    from learners.update import ContinualLearner

    learner = ContinualLearner(base_model, tok, cfg, adapter_dir=adapter)
    rng = random.Random(seed)
    out = [learner.evaluate(held)]
    for s in range(1, steps + 1):
        learner.step(rng.sample(train, cfg.batch_size))
        if s % every == 0:
            out.append(learner.evaluate(held))
    return out, learner


def steps_to(losses: list[float], target: float, every: int) -> int | None:
    for i, v in enumerate(losses):
        if v <= target + 1e-9:
            return i * every
    return None


def score(doc: dict) -> None:
    """The targets, from ``standard``'s curve, and the steps each start needs to reach them."""
    std = doc["curves"]["standard"]
    doc["target_best"] = min(std)
    doc["target_90"] = std[0] - 0.9 * (std[0] - min(std))
    doc["steps_to_target"] = {}
    for which in ("target_best", "target_90"):
        row = {n: steps_to(c, doc[which], doc["eval_every"]) for n, c in doc["curves"].items()}
        for n in ("reptile", "multitask"):  # None: never reached, or reached before any step (0 steps)
            row[f"speedup_{n}"] = row["standard"] / row[n] if row[n] else None
        doc["steps_to_target"][which] = row


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
        ax.plot([i * doc["eval_every"] for i in range(len(c))], c, marker="o", ms=3, label=name)
    ax.axhline(doc["target_best"], ls="--", c="grey", lw=1, label="target: standard's best loss")
    ax.set_xlabel(f"LoRA steps on {doc['new_domain']} (batch {doc['batch_size']}, lr {doc['learning_rate']:g})")
    ax.set_ylabel(f"held-out loss on {doc['new_domain']} (nats/token)")
    ax.set_title("rapid adaptation on a domain unseen while meta-learning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new", default="perl", help="the unseen domain (daemon.corpus.SOURCES)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adaptation steps")
    ap.add_argument("--eval-every", type=int, default=1)
    args = ap.parse_args(argv)
    new, every = args.new, args.eval_every
    import torch
    from transformers import AutoTokenizer

    from bench.continual import load_data
    from learners.meta import ReptileConfig, reptile
    from learners.update import UpdateConfig

    torch.set_num_threads(2)
    per_task, held_n, steps = (16, 8, 4) if args.quick else (64, 16, 24)
    rc = ReptileConfig(rounds=3 if args.quick else 24, inner_steps=2 if args.quick else 4, inner_lr=2e-3, batch_size=8)
    cfg = UpdateConfig(max_seq_len=128, batch_size=8, learning_rate=2e-3, constraints=frozenset())
    adapt_cfg = UpdateConfig(max_seq_len=128, batch_size=8, learning_rate=args.lr, constraints=frozenset())
    base_model = foundation()
    tok = AutoTokenizer.from_pretrained(str(base_model))
    train, held = load_data(per_task, held_n, domains=[*TASKS, new])
    from learners.data import Example

    tasks = {d: [Example(id=r["id"], prompt=r["prompt"], response=r["response"], domain=d) for r in train[d]]
             for d in TASKS}
    new_train = [Example(id=r["id"], prompt=r["prompt"], response=r["response"], domain=new) for r in train[new]]
    work = Path(tempfile.mkdtemp(prefix="cascade-adapt-"))
    doc = {"tasks": TASKS, "new_domain": new, "per_task": per_task, "heldout": held_n, "steps": steps,
           "batch_size": cfg.batch_size, "learning_rate": args.lr, "eval_every": every, "reptile": vars(rc),
           "multitask_learning_rate": cfg.learning_rate, "seconds": {}}
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
        doc["curves"][name] = curve(base_model, tok, adapter, new_train, held[new], steps, adapt_cfg, every)
        print(f"{name}: {[round(x, 3) for x in doc['curves'][name]]}", flush=True)
    score(doc)
    print(doc["steps_to_target"])
    name = "adaptation-quick" if args.quick else "adaptation"
    write_json(f"{name}.json", doc)
    plot(doc, RESULTS / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
