"""Choosing the continual benchmark's budget and the daemon's defaults by measurement.

The same stages, data and held-out sets as ``bench/continual.py``, driven in-process through
``LineageWorker`` (the object each learner actor wraps: same windows, replay, constraints and gate,
without Redis and Ray in between), so that many settings can be compared side by side quickly,
on a GPU when one is present. The numbers it prints are what the defaults were chosen from; the
published figures come from ``bench/continual.py`` through the real daemon.

Usage: ``python -m bench.continual_sweep --lr 2e-3 --per-stage 160 --configs "naive default ..."``
(``--suite unlike``, ``--order reverse``, ``--seed 1`` and ``--heldout-fraction`` as in ``bench/continual.py``,
whose data and held-out sets it uses for the same suite, order, seed and budget).
Each config is ``name`` (a preset below) or ``name:key=value;key=value`` on top of ``default``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, commit, foundation, write_json
from bench.continual import NEW_PER_STEP, REPLAYED_PER_STEP, load_data, summarize
from daemon.corpus import SUITES

PRESETS = {
    "naive": {"replay_ratio": 0, "constraints": "none", "gate": "off", "curation": "none", "batch_size": NEW_PER_STEP},
    "joint": {"replay_ratio": 0, "constraints": "none", "gate": "off", "curation": "none", "batch_size": NEW_PER_STEP},
    "default": {"batch_size": NEW_PER_STEP + REPLAYED_PER_STEP},
}


def parse_config(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    base = dict(PRESETS.get(name.split("+")[0], PRESETS["default"]))
    for kv in filter(None, rest.split(";")):
        k, _, v = kv.partition("=")
        base[k.strip()] = v.strip()
    return spec, base


def run(name: str, overrides: dict, train: dict, held: dict, common: dict, base_model: Path) -> dict:
    domains = list(train)
    import torch

    from daemon.config import Settings
    from daemon.foundation import ensure_foundation
    from daemon.lineage import LineageWorker
    from daemon.registry import Registry
    from daemon.schema import Interaction
    from learners.update import evaluate_loss

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as home:
        s = Settings(home=Path(home), base_model=base_model, **{**common, **overrides})
        ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
        w = LineageWorker(s, "main")
        stages = [[r for d in domains for r in train[d]]] if name.startswith("joint") else [train[d] for d in domains]
        if name.startswith("joint"):
            random.Random(1).shuffle(stages[0])
        rows, k = [], 0
        for recs in stages:
            its = []
            for r in recs:
                k += 1
                its.append(Interaction(entry_id=f"{k}-0", id=r["id"], prompt=r["prompt"], response=r["response"],
                                       meta=r["meta"]))
            w.learn_all(its)
            model = w.learner.model
            rows.append([evaluate_loss(model, w.tokenizer, held[d], s.max_seq_len, 8) for d in domains])
        out = {"R": rows, "seconds": time.monotonic() - t0, "update_steps": w.counters["update_steps"],
               "rollbacks": w.counters.get("rollbacks", 0), "learned": w.counters["interactions_learned"],
               "deferred": w.counters["deferred"], "refused": w.counters["refused"],
               "deferred_waiting": len(w.deferred), "settings": {k: str(v) for k, v in overrides.items()},
               # Settings also read CASCADE_* from the environment: record what was there, and the threads.
               "environment": {k: v for k, v in os.environ.items() if k.startswith("CASCADE_")},
               "precision": s.precision, "threads": torch.get_num_threads()}
        w.close()
    return out


def load_or_build(path: str | None, per_stage: int, heldout: int, domains: list[str],
                  seed: int = 0) -> tuple[dict, dict]:
    from learners.data import Example

    if path and Path(path).exists():
        doc = json.loads(Path(path).read_text())
        return doc["train"], {d: [Example.from_json(x) for x in v] for d, v in doc["held"].items()}
    train, held = load_data(per_stage, heldout, seed, domains)
    if path:
        Path(path).write_text(json.dumps({"train": train, "held": {d: [e.to_json() for e in v]
                                                                      for d, v in held.items()}}))
    return train, held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--per-stage", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--configs", default="naive default joint", help="space-separated specs")
    ap.add_argument("--out", default="continual-sweep.json")
    ap.add_argument("--suite", choices=sorted(SUITES), default="related")
    ap.add_argument("--heldout-fraction", type=float, default=0.05)
    ap.add_argument("--order", choices=("forward", "reverse"), default="forward", help="the order of the stages")
    ap.add_argument("--seed", type=int, default=0, help="data split, sampling and the learner's seed")
    ap.add_argument("--data", help="JSON of the stages' data: read if it exists, else written (for another machine "
                    "whose corpora differ)")
    args = ap.parse_args(argv)
    base_model = foundation()
    domains = SUITES[args.suite][:: 1 if args.order == "forward" else -1]
    train, held = load_or_build(args.data, args.per_stage, args.heldout, domains, args.seed)
    common = {"max_seq_len": args.seq, "learning_rate": args.lr, "reduce_every": 0, "window_steps": 4,
              "heldout_fraction": args.heldout_fraction, "seed": args.seed, "curation": "none"}  # as bench/continual
    path = RESULTS / args.out
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    for spec in args.configs.split():
        name, overrides = parse_config(spec)
        res = run(name, overrides, train, held, common, base_model)
        res["summary"] = summarize(res, [float("nan")] * len(domains))
        res.update(name=name, lr=args.lr, per_stage=args.per_stage, suite=args.suite, order=args.order, seed=args.seed,
                   heldout_fraction=args.heldout_fraction, **commit())
        doc["runs"].append(res)
        s = res["summary"]
        print(f"{name:60s} lr={args.lr:g} n={args.per_stage} ppl={s['avg_final_ppl']:.3f} "
              f"forget={s.get('avg_forgetting', float('nan')):.4f} plast={s.get('plasticity', [])} "
              f"final={[round(x, 3) for x in res['R'][-1]]} rb={res['rollbacks']} learned={res['learned']} "
              f"waiting={res['deferred_waiting']} {res['seconds']:.0f}s", flush=True)
        write_json(path.name, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
