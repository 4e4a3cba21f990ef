"""Domain-incremental continual learning through the real daemon, on SmolLM2-135M.

Four real corpora found on this machine arrive one after another as interactions (Redis stream in,
wait for lag 0 / pending 0, evaluate ``live/`` on every domain's held-out documents after each stage).
Train and held-out data are split by document. Configurations, side by side in one run:

* ``naive``   - CASCADE_REPLAY_RATIO=0 CASCADE_CONSTRAINTS=none CASCADE_GATE=off
* ``default`` - the daemon's defaults (replay 40% of each batch, distillation toward the generation
                on replayed rows, clipping and the update cap, the gate), with ``NEW_PER_STEP`` new rows
                plus 3 replayed rows a step (batch 7)
* ``joint``   - every stage's interactions shuffled together and learned in one pass (the upper
                reference), with naive's settings
* ``avalanche-replay``, ``avalanche-ewc``, ``avalanche-lwf`` - avalanche-lib's Naive strategy with its
                Replay, EWC and LwF plugins on the same model, adapter, data and steps
                (``bench/avalanche_baselines.py``; these run in ``.venv-avalanche``, not through the daemon)

All take the same number of optimizer steps over the same new interactions (``NEW_PER_STEP`` new
rows a step); ``default`` adds replayed rows to each step.

The budget (128 interactions a stage, learning rate 2e-3) and the defaults were chosen with
``bench/continual_sweep.py`` (results in ``bench/results/continual-sweep.json``): it is the smallest
budget found at which naive fine-tuning forgets more than 0.1 nats on average.

Usage: ``python -m bench.continual [--quick] [--configs naive,default,...] [--update]``
(``--suite unlike``, ``--order reverse``, ``--seed 1`` for the other variants; ``--targets`` prints the
issue's targets over every stored variant); writes
bench/results/continual[-quick].json and .png; each configuration records the commit it ran at, and
``--update`` reruns only ``--configs``, keeping the others of the existing JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, Daemon, commit, commit_marks, foundation, live_model, ppl, write_json
from daemon.cli import fates
from daemon.corpus import SUITES

ROOT = Path(__file__).resolve().parents[1]

DOMAINS = ["man", "python", "rust", "c"]  # the "related" suite (daemon/corpus.py SUITES)
NEW_PER_STEP = 4
LEARNING_RATE = 2e-3
REPLAYED_PER_STEP = 3  # default's batch: NEW_PER_STEP new + round(0.4 * 7) = 3 replayed rows


def load_data(per_stage: int, heldout: int, seed: int = 0, domains: list[str] = DOMAINS) -> tuple[dict, dict]:
    from daemon.corpus import SOURCES, interactions
    from learners.data import Example

    train, held = {}, {}
    for d in domains:
        docs = SOURCES[d](per_stage // 3 + heldout // 3 + 8, seed)
        n_held_docs = max(2, heldout // 3 + 1)
        h_docs, t_docs = docs[:n_held_docs], docs[n_held_docs:]
        recs = [r for doc in t_docs for r in interactions(doc, d)]
        random.Random(seed).shuffle(recs)
        train[d] = [{**r, "id": f"{d}-{i}"} for i, r in enumerate(recs[:per_stage])]
        held[d] = [Example(id=f"h-{d}-{i}", prompt=r["prompt"], response=r["response"], domain=d)
                   for i, r in enumerate(r for doc in h_docs for r in interactions(doc, d))][:heldout]
        assert len(train[d]) == per_stage, (d, len(train[d]))
    return train, held


def evaluate(home, held, max_seq_len: int) -> dict[str, float]:
    import torch

    from learners.update import evaluate_loss

    torch.set_num_threads(2)
    model, tok = live_model(home)
    return {d: evaluate_loss(model, tok, ex, max_seq_len, 8) for d, ex in held.items()}


def run_config(name: str, settings: dict, train: dict, held: dict, work, max_seq_len: int) -> dict:
    t0 = time.monotonic()
    daemon = Daemon(work / name, settings, "daemon.log")
    rows = []
    try:
        if name == "joint":
            everything = [r for d in train for r in train[d]]
            random.Random(1).shuffle(everything)
            daemon.publish(everything)
            daemon.wait_drained()
            rows.append(evaluate(daemon.home, held, max_seq_len))
        else:
            for d in train:  # the stages, in the suite's order
                daemon.publish(train[d])
                daemon.wait_drained()
                rows.append(evaluate(daemon.home, held, max_seq_len))
                print(f"  {name}: after {d}: " + " ".join(f"{k}={v:.3f}" for k, v in rows[-1].items()), flush=True)
        state = json.loads((daemon.home / "registry/main/live/state.json").read_text())
    finally:
        daemon.stop()
    c, f = state["counters"], fates(state)
    arrived = sum(len(v) for v in train.values())
    # Every interaction's fate: learned, held out, still deferred, refused or skipped (none may be lost).
    accounted = f["learned"] + f["heldout"] + f["deferred_waiting"] + f["refused"] + f["skipped"]
    if accounted != arrived:
        print(f"  {name}: {arrived} interactions arrived but the fates add up to {accounted}: {f}", flush=True)
    return {"R": [[row[d] for d in train] for row in rows], "seconds": time.monotonic() - t0,
            "update_steps": state["update_steps"], "interactions_learned": state["interactions_learned"],
            "rollbacks": c.get("rollbacks", 0), "deferred": c.get("deferred", 0), "refused": c.get("refused", 0),
            "deferred_waiting": state.get("deferred_waiting", 0), "fates": f, "arrived": arrived,
            "settings": settings}


def run_avalanche(name: str, base_model, train: dict, held: dict, seq: int) -> dict:
    """One Avalanche baseline, run by ``.venv-avalanche``'s Python (see ``bench/avalanche_baselines.py``)."""
    python = ROOT / ".venv-avalanche" / "bin" / "python"
    if not python.is_file():
        raise SystemExit(f"{python} is missing: `make bench` makes it (or leave {name} out of --configs)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({
            "name": name, "base_model": str(base_model), "domains": list(train), "train": train,
            "held": {d: [ex.to_json() for ex in v] for d, v in held.items()},
            "seq": seq, "lr": LEARNING_RATE, "rank": 16, "new_per_step": NEW_PER_STEP,
            "replay_rows": REPLAYED_PER_STEP, "mem_size": 2000, "threads": 2}))
        subprocess.run([str(python), "-m", "bench.avalanche_baselines", str(job), str(out)], cwd=ROOT, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        R = json.loads(out.read_text())["R"]
    n = sum(len(v) for v in train.values())
    return {"R": R, "seconds": time.monotonic() - t0, "update_steps": n // NEW_PER_STEP,
            "interactions_learned": n, "rollbacks": 0, "settings": {"strategy": name, "learning_rate": LEARNING_RATE}}


def summarize(res: dict, base: list[float]) -> dict:
    R = res["R"]
    final = R[-1]
    out = {"avg_final_loss": sum(final) / len(final), "avg_final_ppl": sum(ppl(x) for x in final) / len(final)}
    if len(R) == len(R[0]):  # one row per stage (not joint's single row)
        T = len(R[0])
        out["forgetting"] = [max(0.0, final[d] - min(R[s][d] for s in range(d, T))) for d in range(T - 1)]
        out["avg_forgetting"] = sum(out["forgetting"]) / (T - 1)
        out["backward_transfer"] = sum(R[d][d] - final[d] for d in range(T - 1)) / (T - 1)
        out["plasticity"] = [R[d][d] for d in range(T)]
        out["plasticity_gain"] = [base[d] - R[d][d] for d in range(T)]
    return out


def plot(doc: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = doc["domains"]
    staged = [k for k, v in doc["configs"].items() if len(v["R"]) == len(domains)]
    fig, axes = plt.subplots(1, len(staged), figsize=(4.2 * len(staged), 3.8), squeeze=False)
    for ax, name in zip(axes[0], staged):
        R = doc["configs"][name]["R"]
        im = ax.imshow(R, cmap="viridis_r")
        ax.set_xticks(range(len(domains)), domains)
        ax.set_yticks(range(len(domains)), [f"after {d}" for d in domains])
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(f"{name}: held-out loss R[stage][domain]")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: few interactions per stage")
    ap.add_argument("--table", metavar="JSON", help="only print the README table of an earlier run")
    ap.add_argument("--targets", action="store_true",
                    help="only print, for every stored suite/order/seed, the default against naive and joint")
    ap.add_argument("--configs",
                    default="naive,default,joint,avalanche-replay,avalanche-ewc,avalanche-lwf")
    ap.add_argument("--suite", choices=sorted(SUITES), default="related",
                    help="related: man/python/rust/c (help one another); unlike: locale/changelog/js/man (interfere)")
    ap.add_argument("--order", choices=("forward", "reverse"), default="forward", help="the order of the stages")
    ap.add_argument("--seed", type=int, default=0, help="data split, sampling and the learners' seed")
    ap.add_argument("--per-stage", type=int, default=128,
                    help="interactions a stage (the gate judges a source once its held-out share reaches "
                         "CASCADE_GATE_MIN_ITEMS: about 160 at the defaults)")
    ap.add_argument("--heldout-fraction", type=float, default=0.05,
                    help="CASCADE_HELDOUT_FRACTION for every configuration: the gate judges a source once it "
                         "holds CASCADE_GATE_MIN_ITEMS of them (at 0.05 and 160 a stage, never)")
    ap.add_argument("--update", action="store_true",
                    help="keep the configurations of the existing JSON that --configs does not rerun")
    args = ap.parse_args(argv)
    if args.targets:
        print(targets(RESULTS.glob("continual*.json")))
        return 0
    if args.table:
        print(markdown_table(json.loads(open(args.table).read())))
        return 0
    per_stage, heldout, seq = (16, 8, 96) if args.quick else (args.per_stage, 16, 128)
    base_model = foundation()
    domains = SUITES[args.suite][:: 1 if args.order == "forward" else -1]
    train, held = load_data(per_stage, heldout, args.seed, domains)
    common = {"base_model": base_model, "max_seq_len": seq, "learning_rate": LEARNING_RATE, "reduce_every": 0,
              "window_steps": 4, "metrics_port": 0, "heldout_fraction": args.heldout_fraction, "seed": args.seed,
              "curation": "none"}  # every configuration learns every interaction (bench/curation measures curation)
    configs = {
        "naive": {**common, "replay_ratio": 0, "constraints": "none", "gate": "off", "batch_size": NEW_PER_STEP},
        "default": {**common, "batch_size": NEW_PER_STEP + REPLAYED_PER_STEP},
        "default+anchor": {**common, "batch_size": NEW_PER_STEP + REPLAYED_PER_STEP, "anchor_weight": 0.1,
                           "constraints": "replay,anchor,distill,clip"},
        # the gate measuring every held-out item after every window (the sequential gate's baseline)
        "default+full-gate": {**common, "batch_size": NEW_PER_STEP + REPLAYED_PER_STEP, "gate_first_items": 0},
        "joint": {**common, "replay_ratio": 0, "constraints": "none", "gate": "off", "batch_size": NEW_PER_STEP},
    }
    base = evaluate_foundation(base_model, held, seq)
    print("foundation: " + " ".join(f"{k}={v:.3f}" for k, v in base.items()), flush=True)
    doc = {"suite": args.suite, "order": args.order, "seed": args.seed, "domains": domains, "per_stage": per_stage,
           "heldout_per_domain": heldout, "max_seq_len": seq, "new_per_step": NEW_PER_STEP,
           "foundation_loss": [base[d] for d in domains], "configs": {}}
    variant = "" if (args.suite, args.order, args.seed) == ("related", "forward", 0) else \
        f"-{args.suite}-{args.order}-s{args.seed}"
    variant += f"-n{per_stage}" if per_stage != 128 and not args.quick else ""
    variant += f"-h{args.heldout_fraction:g}" if args.heldout_fraction != 0.05 else ""
    suffix = variant + ("-quick" if args.quick else "")
    path = RESULTS / f"continual{suffix}.json"
    work = RESULTS.parent / ".work" / f"continual{suffix}"  # one per variant: two variants may run side by side
    if args.update and path.exists():
        stored = json.loads(path.read_text())
        # Rows measured on other data (another machine's corpora) cannot stand beside these: refuse to merge.
        if any(abs(a - b) > 1e-3 for a, b in zip(stored.get("foundation_loss", []), doc["foundation_loss"])):
            raise SystemExit(f"{path.name} was measured on other data (foundation held-out losses "
                             f"{[round(x, 3) for x in stored['foundation_loss']]}, here "
                             f"{[round(x, 3) for x in doc['foundation_loss']]}): run without --update")
        doc["configs"] = stored["configs"]
    for name in args.configs.split(","):
        print(f"running {name}", flush=True)
        started = commit()  # the code this configuration runs (the tree may change while it runs)
        if name.startswith("avalanche"):
            res = run_avalanche(name, base_model, train, held, seq)
        else:
            res = run_config(name, configs[name], train, held, work, seq)
        res["summary"] = summarize(res, doc["foundation_loss"])
        res.update(started, finished=time.strftime("%Y-%m-%d %H:%M", time.gmtime()))
        doc["configs"][name] = res
        res["settings"] = {k: str(v) for k, v in res["settings"].items()}
        print(f"  {name}: {json.dumps(res['summary'])}", flush=True)
        write_json(path.name, doc)  # after every configuration: a long run keeps what it has
        plot(doc, RESULTS / f"continual{suffix}.png")
    print_table(doc)
    return 0


def evaluate_foundation(base_model, held, seq) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer

    from learners.update import evaluate_loss, load_causal_lm

    torch.set_num_threads(2)
    model, tok = load_causal_lm(base_model), AutoTokenizer.from_pretrained(str(base_model))
    return {d: evaluate_loss(model, tok, ex, seq, 8) for d, ex in held.items()}


def markdown_table(doc: dict) -> str:
    """The README table: one row per configuration."""
    lines = ["| config | avg final ppl | avg forgetting (nats) | backward transfer (nats) | loss right after own stage "
             f"({', '.join(doc['domains'])}) | steps | rollbacks | deferred | refused | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    note, marks = commit_marks(list(doc["configs"].values()))
    lines.insert(0, note + "\n")
    for (name, res), mark in zip(doc["configs"].items(), marks):
        s = res["summary"]
        f = f"{s['avg_forgetting']:.4f}" if "avg_forgetting" in s else "-"
        b = f"{s['backward_transfer']:+.4f}" if "backward_transfer" in s else "-"
        p = " / ".join(f"{x:.3f}" for x in s.get("plasticity", [])) or "-"
        lines.append(f"| {name}{mark} | {s['avg_final_ppl']:.3f} | {f} | {b} | {p} | {res['update_steps']} | "
                     f"{res['rollbacks']} | {res.get('deferred', '-')} | {res.get('refused', '-')} | "
                     f"{res['seconds'] / 60:.1f} |")
    return "\n".join(lines)


VARIANT_RE = (r"continual(?:-(?P<suite>[a-z]+)-(?P<order>forward|reverse)-s(?P<seed>\d+))?"
              r"(?P<size>(?:-n\d+)?(?:-h0\.\d+)?)\.json")  # the name main() gives a result, not -quick's


def targets(paths) -> str:
    """Issue 22's targets, one row per result file (a suite, order, seed and size) that has ``naive`` and
    ``default``: the default's average forgetting over naive's (at most 0.25), its worst loss right after
    a stage over naive's (at most 1.03), its final perplexity over joint's (at most 1.05), and what the gate
    did. Joint learns every stage's interactions shuffled together, so the order does not matter to it: a
    file without joint is compared with the joint of the other order (marked ``*``) when that file has the
    same data (suite, seed, size and the foundation's held-out losses per domain); '-' where neither has
    one. A missing variant is simply not listed."""
    docs = {}
    for path in sorted(paths):
        m = re.fullmatch(VARIANT_RE, Path(path).name)
        if m:  # the name of the related suite's forward order at seed 0 leaves those three out
            key = {"suite": m["suite"] or "related", "order": m["order"] or "forward", "seed": int(m["seed"] or 0),
                   "size": m["size"]}
            docs[Path(path).name] = (key, json.loads(Path(path).read_text()))

    def same_data(a: dict, b: dict) -> bool:
        fa, fb = (dict(zip(d.get("domains", []), d.get("foundation_loss", []))) for d in (a, b))
        return bool(fa) and fa.keys() == fb.keys() and all(abs(fa[k] - fb[k]) <= 1e-3 for k in fa)

    lines = ["| suite | order | seed | file | forgetting / naive (<= 0.25) | worst own-stage loss / naive (<= 1.03) | "
             "final ppl / joint (<= 1.05) | rollbacks | deferred | refused | default's commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (m, doc) in docs.items():
        cfg = doc["configs"]
        if "naive" not in cfg or "default" not in cfg:
            continue
        n, d = cfg["naive"]["summary"], cfg["default"]["summary"]
        forget = d["avg_forgetting"] / n["avg_forgetting"] if n["avg_forgetting"] > 0 else float("inf")
        worst = max(a / b for a, b in zip(d["plasticity"], n["plasticity"]))
        joint, mark = cfg.get("joint"), ""
        if joint is None:
            twins = [o["configs"]["joint"] for other, (mo, o) in docs.items() if other != name and "joint" in
                     o["configs"] and (mo["suite"], mo["seed"], mo["size"]) == (m["suite"], m["seed"], m["size"])
                     and same_data(o, doc)]
            joint, mark = (twins[0], "*") if twins else (None, "")
        ratio = f"{d['avg_final_ppl'] / joint['summary']['avg_final_ppl']:.3f}{mark}" if joint else "-"
        res = cfg["default"]
        lines.append(f"| {m['suite']} | {m['order']} | {m['seed']} | {name} "
                     f"| {forget:.2f} | {worst:.3f} | {ratio} | {res['rollbacks']} | {res.get('deferred', '-')} | "
                     f"{res.get('refused', '-')} | {res.get('commit', '?')} |")
    return "\n".join(lines)


def print_table(doc: dict) -> None:
    print()
    print(markdown_table(doc))


if __name__ == "__main__":
    raise SystemExit(main())
