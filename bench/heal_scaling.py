"""What healing at one keep ratio buys with more steps and more data (a question, not a default).

The reduction benchmark heals every pruned model for the daemon's budget (24 steps). This asks how far
distillation alone goes when that budget grows: the benchmark's specialized model (32 LoRA steps on
Python, merged), pruned to ``--keep`` by activations on the 48 target calibration items with the
allocation the daemon would choose — plain pruning, as the published run measured it, or with
``--reconstruct`` the daemon's least-squares refit and block-by-block reconstruction on the lineage's own
176 items (the reduction benchmark's calibration) — then healed by :func:`learners.reduction.heal` on either the 48
calibration items or a pool of ``--pool`` target items, with target-domain held-out perplexity read at
checkpoints along the way. Slow on a CPU; meant for a GPU.

Usage: ``python -m bench.heal_scaling [--reconstruct] [--keep 0.6] [--steps 24,96,384] [--pool 1024] [--lrs 1e-4] [--batch 8]
[--pools calibration,pool] [--data JSON]`` (``--data``: the data as JSON, read if it exists, else written, for a machine whose corpora
differ). Writes bench/results/heal-scaling.json.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from bench.common import foundation, ppl, write_json
from bench.reduction import choose_plan, load_data, specialize


def load_or_build(path: str | None, pool: int) -> dict:
    from learners.data import Example

    if path and Path(path).exists():
        doc = json.loads(Path(path).read_text())
        return {k: [Example.from_json(x) for x in v] if k != "train_records" else v for k, v in doc.items()}
    data = load_data(128 + pool, 48, 24, n_other=48)
    if path:
        Path(path).write_text(json.dumps({k: v if k == "train_records" else [e.to_json() for e in v]
                                          for k, v in data.items()}))
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.6)
    ap.add_argument("--steps", default="24,96,384", help="checkpoints (the last is the run's length)")
    ap.add_argument("--pool", type=int, default=1024, help="target items beyond the specialization's 128")
    ap.add_argument("--lrs", default="1e-4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--data")
    ap.add_argument("--out", default="heal-scaling.json")
    ap.add_argument("--reconstruct", action="store_true", help="refit and reconstruct before healing, as the daemon")
    ap.add_argument("--pools", default="calibration,pool", help="which healing data: calibration, pool or both")
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from learners.reduction import activation_importance, heal, kept_blocks, prune, reconstruct
    from learners.update import evaluate_loss

    seq = 128
    base = foundation()
    tok = AutoTokenizer.from_pretrained(str(base))
    data = load_or_build(args.data, args.pool)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoints = [int(s) for s in args.steps.split(",")]
    # The benchmark's specialized model; on a GPU the specialization itself runs there too.
    spec = specialize(base, tok, {**data, "train": data["train"][:128]}, 32, seq).to(device)
    pools = {"calibration (48)": data["calib"], f"pool ({len(data['train'][128:])})": data["train"][128:]}
    pools = {k: v for k, v in pools.items() if k.split()[0] in args.pools.split(",")}
    target = lambda m: ppl(evaluate_loss(m, tok, data["held"], seq))  # noqa: E731
    own = data["train"][:128] + data["calib"]
    if args.reconstruct:
        imp = activation_importance(spec, own, tok, seq)
    else:  # plain pruning: scored on the calibration items, no least-squares refit
        imp = replace(activation_importance(spec, data["calib"], tok, seq), mlp_gram=None, attn_gram=None)
    plan, _ = choose_plan(spec, imp, tok, data["calib"], seq, args.keep)
    doc = {"keep": args.keep, "plan": plan.label, "device": device, "reconstruct": args.reconstruct,
           "machine": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": args.batch,
           "unpruned_ppl": target(spec), "runs": []}
    print(f"unpruned {doc['unpruned_ppl']:.2f}, plan {plan.label}", flush=True)
    for lr in [float(x) for x in args.lrs.split(",")]:
        for pool_name, pool in pools.items():
            student = prune(spec, imp, plan.intermediate, plan.kv_heads, plan.layers)
            if args.reconstruct:
                reconstruct(student, spec, kept_blocks(imp, plan.layers), own, tok, seq)
            run = {"lr": lr, "data": pool_name, "pruned_ppl": target(student), "at": {}}
            doc["runs"].append(run)
            print(f"  lr {lr:g} {pool_name}: before healing ppl {run['pruned_ppl']:.2f}", flush=True)
            t0 = time.monotonic()

            def progress(step: int, total: int, loss: float) -> None:
                if step in checkpoints:
                    p = target(student)
                    run["at"][step] = {"ppl": p, "ratio": p / doc["unpruned_ppl"], "kl": loss,
                                       "seconds": time.monotonic() - t0}
                    print(f"  lr {lr:g} {pool_name}: step {step} ppl {run['at'][step]['ppl']:.2f} "
                          f"({run['at'][step]['ratio']:.2f}x)", flush=True)
                    write_json(args.out, doc)  # a run cut off by a time limit keeps its checkpoints

            heal(student, spec, pool, tok, seq, checkpoints[-1], lr=lr, batch_size=args.batch, progress=progress)
            del student
    print(json.dumps(doc["runs"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
