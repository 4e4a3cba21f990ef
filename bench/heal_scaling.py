"""What healing at one keep ratio buys with more steps and more data (a question, not a default).

The reduction benchmark heals every pruned model for the daemon's budget (24 steps). This asks how far
distillation alone goes when that budget grows: the benchmark's specialized model (32 LoRA steps on
Python, merged), reduced to ``--keep`` by the daemon's reducer (``learners.reduce.reduce``, through
``bench.reduction.reduce_once``) — plain pruning scored on the 48 target calibration items (refit and
reconstruction switched off), as the published run measured it, or with ``--reconstruct`` the daemon's
least-squares refit and block-by-block reconstruction on the lineage's own 176 items (the reduction
benchmark's calibration), each kept where the target held-out set agrees — then healed for the run's
steps (``Switches.heal_steps``, ``heal_lr``, ``heal_batch``) on either the 48 calibration items or a pool
of ``--pool`` target items, with target-domain held-out perplexity read at checkpoints along the way
(``Switches.on_heal_step``). Slow on a CPU; meant for a GPU.

Usage: ``python -m bench.heal_scaling [--quick] [--reconstruct] [--keep 0.6] [--steps 24,96,384] [--pool 1024] [--lrs 1e-4] [--batch 8]
[--pools calibration,pool] [--data JSON]`` (``--data``: the data as JSON, read if it exists, else written, for a machine whose corpora
differ). Writes bench/results/heal-scaling.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import foundation, ppl, write_json
from bench.reduction import load_data, reduce_once, specialize


def load_or_build(path: str | None, pool: int, quick: bool = False) -> dict:
    from learners.data import Example

    if path and Path(path).exists():
        doc = json.loads(Path(path).read_text())
        return {k: [Example.from_json(x) for x in v] if k != "train_records" else v for k, v in doc.items()}
    data = load_data(16 + pool, 8, 8, n_other=8) if quick else load_data(128 + pool, 48, 24, n_other=48)
    if path:
        Path(path).write_text(json.dumps({k: v if k == "train_records" else [e.to_json() for e in v]
                                          for k, v in data.items()}))
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, 2 healing steps")
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

    from learners.update import evaluate_loss

    seq, n_spec = (64, 16) if args.quick else (128, 128)
    if args.quick:
        args.steps, args.pool, args.out = "1,2", 16, "heal-scaling-quick.json"
    base = foundation()
    tok = AutoTokenizer.from_pretrained(str(base))
    data = load_or_build(args.data, args.pool, args.quick)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoints = [int(s) for s in args.steps.split(",")]
    # The benchmark's specialized model; on a GPU the specialization itself runs there too.
    spec = specialize(base, tok, {**data, "train": data["train"][:n_spec]}, 4 if args.quick else 32, seq).to(device)
    pools = {f"calibration ({len(data['calib'])})": data["calib"],
             f"pool ({len(data['train'][n_spec:])})": data["train"][n_spec:]}
    pools = {k: v for k, v in pools.items() if k.split()[0] in args.pools.split(",")}
    target = lambda m: ppl(evaluate_loss(m, tok, data["held"], seq))  # noqa: E731
    own = data["train"][:n_spec] + data["calib"]
    # --reconstruct: the daemon's steps on the lineage's own items; else plain pruning scored on the calibration items.
    calibration, switches = (own, {}) if args.reconstruct else (data["calib"], {"refit": "off", "reconstruct": "off"})
    doc = {"keep": args.keep, "device": device, "reconstruct": args.reconstruct,
           "machine": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": args.batch,
           "unpruned_ppl": target(spec), "runs": []}
    for lr in [float(x) for x in args.lrs.split(",")]:
        for pool_name, pool in pools.items():
            run = {"lr": lr, "data": pool_name, "at": {}}
            doc["runs"].append(run)
            t0 = time.monotonic()

            def at_step(student, step: int, total: int, loss: float, run=run) -> None:
                if step in checkpoints:
                    p = target(student)
                    run["at"][step] = {"ppl": p, "ratio": p / doc["unpruned_ppl"], "kl": loss,
                                       "seconds": time.monotonic() - t0}
                    print(f"  lr {run['lr']:g} {run['data']}: step {step} ppl {p:.2f} "
                          f"({run['at'][step]['ratio']:.2f}x)", flush=True)
                    write_json(args.out, doc)  # a run cut off by a time limit keeps its checkpoints

            red = reduce_once(spec, tok, {**data, "train": data["train"][:n_spec]}, seq, args.keep, checkpoints[-1], calibration, heal_items=pool,
                              heal_lr=lr, heal_batch=args.batch, on_heal_step=at_step, **switches)
            (t,) = red.record.tries
            doc["plan"] = t.plan
            run["pruned_ppl"] = t.ppl_before_healing["target"]
            run["refit_kept"], run["reconstruction_kept"] = t.refit_kept, t.reconstruction_kept
            print(f"  lr {lr:g} {pool_name} ({t.plan}): before healing ppl {run['pruned_ppl']:.2f}", flush=True)
            del red
    print(json.dumps(doc["runs"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
