"""Generational reduction on SmolLM2-135M specialized to one real domain.

1. Specialize: a LoRA adapter learns Python standard-library sources, then is merged (the model the
   reduction starts from, as in the daemon).
2. For each keep ratio, the daemon's reducer (``learners.reduce.reduce``, the function the daemon calls)
   runs with four importance scores: activations on the target domain (the method: the lineage's own
   176 items, as the daemon's calibration set), activations on as many items of another domain (man
   pages), weight magnitude, random. The allocation (MLP width / KV groups / depth) is the one the
   reducer chooses for the target-domain scores; the other three prune to that same shape
   (``Switches.plan``). The calibrated ones get the daemon's least-squares refit and block-by-block
   reconstruction on their calibration data, each kept only where the target held-out set agrees (the
   daemon's rule; the data-free baselines have no data to reconstruct on: ``reconstruct="off"``). Each is
   then healed by distillation from the specialized model on the lineage's items for the same steps.
   Perplexity on target and other held-out documents after pruning, reconstruction and healing
   (the other domain as a ``watch`` set: measured, never judged), parameters and safetensors bytes are
   recorded.
3. Speed and memory, side by side: CPU forward tokens/s of each keep's activation-pruned model against
   the unpruned specialized model (interleaved repetitions, median), and peak RSS of a fresh process
   that loads the checkpoint and runs the same forward.
4. Calibration data: at the middle keep ratio, the same method with more of the lineage's items for
   importance, reconstruction and healing (the daemon's ``CASCADE_CALIBRATION_ITEMS``), the first
   size being the 176 above.
5. Cascade: the real daemon learns target data and is asked to reduce (``cascade reduce``) three times
   in a row: gen-0 -> gen-1 -> gen-2 -> gen-3, each a precursor of the next; size and held-out
   perplexity of each generation.

Usage: ``python -m bench.reduction [--quick] [--keeps 0.8,0.6,0.4] [--calibration 176,600]
[--skip-cascade | --cascade-only | --calibration-only] [--threads N]``;
``--table JSON`` prints the README tables. Writes bench/results/reduction[-quick].json and .png after
every step, so a long run keeps what it has.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (RESULTS, Daemon, commit, commit_marks, foundation, live_model, ppl, safetensors_bytes,
                          write_json)

TARGET, OTHER = "python", "man"
METHODS = ["activation-target", "activation-other", "magnitude", "random"]


def load_data(n_train: int, n_calib: int, n_held: int, seed: int = 0, n_other: int | None = None) -> dict:
    """Target train / calibration / held-out and other-domain calibration / held-out, split by document.
    The other domain calibrates on ``n_other`` items, by default as many as the target's own (train +
    calibration)."""
    from daemon.corpus import SOURCES, interactions
    from learners.data import Example

    def records(domain: str, n_docs: int) -> tuple[list, list]:
        docs = SOURCES[domain](n_docs, seed)
        n_held_docs = max(2, n_held // 4 + 1)
        held = [r for d in docs[:n_held_docs] for r in interactions(d, domain)]
        rest = [r for d in docs[n_held_docs:] for r in interactions(d, domain)]
        random.Random(seed).shuffle(rest)
        return held[:n_held], rest

    def ex(recs, tag):
        return [Example(id=f"{tag}-{i}", prompt=r["prompt"], response=r["response"], domain=r["meta"]["domain"])
                for i, r in enumerate(recs)]

    t_held, t_rest = records(TARGET, (n_train + n_calib + n_held) // 3 + 8)
    n_own = n_train + n_calib
    n_other = n_own if n_other is None else n_other
    o_held, o_rest = records(OTHER, (n_other + n_held) // 3 + 8)
    assert len(t_rest) >= n_own and len(o_rest) >= n_other, "not enough text found on this machine"
    return {"train_records": t_rest[:n_train], "train": ex(t_rest[:n_train], "train"),
            "calib": ex(t_rest[n_train:n_own], "calib"), "held": ex(t_held, "held"),
            "other_calib": ex(o_rest[:n_other], "ocalib"), "other_held": ex(o_held, "oheld")}


def specialize(base: Path, tok, data: dict, steps: int, seq: int):
    from learners.reduction import merge_adapter
    from learners.update import ContinualLearner, UpdateConfig

    cfg = UpdateConfig(learning_rate=1e-3, batch_size=4, max_seq_len=seq, constraints=frozenset())
    learner = ContinualLearner(base, tok, cfg)
    train = data["train"]
    for i in range(steps):
        learner.step([train[(4 * i + k) % len(train)] for k in range(4)])
    return merge_adapter(learner.model, data["calib"][:4], tok, seq).eval()


def file_bytes(model, tok, where: Path) -> int:
    model.save_pretrained(str(where), safe_serialization=True)
    tok.save_pretrained(str(where))
    return safetensors_bytes(where)


def forward_speed(models: dict, examples, seq: int, reps: int, per_byte: bool = False) -> dict[str, float]:
    """Tokens/s (with ``per_byte``, text bytes/s) of one forward over the same texts, for ``models``
    {name: (model, its tokenizer)}, interleaved across models, median of ``reps``."""
    import torch

    from learners.data import collate

    batches = {}
    for k, (_m, tok) in models.items():
        b = collate(tok, list(examples), seq)
        ids = b.input_ids[b.attention_mask.bool()].tolist()
        batches[k] = (b, len(tok.decode(ids, skip_special_tokens=True).encode()) if per_byte else len(ids))
    times = {k: [] for k in models}
    with torch.no_grad():
        for rep in range(reps + 1):  # round 0 warms up
            for k, (m, _tok) in models.items():
                b = batches[k][0]
                t0 = time.perf_counter()
                m(input_ids=b.input_ids, attention_mask=b.attention_mask)
                if rep:
                    times[k].append(time.perf_counter() - t0)
    return {k: batches[k][1] / statistics.median(v) for k, v in times.items()}


PEAK_RSS = """
import learners, sys, torch
from transformers import AutoTokenizer
from learners.data import Example, collate
from learners.update import load_causal_lm
torch.set_num_threads(int(sys.argv[3]))
m = load_causal_lm(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
b = collate(tok, [Example(id=str(i), prompt="x " * 400, response="y " * 400) for i in range(4)], int(sys.argv[2]))
with torch.no_grad():
    m(input_ids=b.input_ids, attention_mask=b.attention_mask)
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def peak_rss(model_dir: Path, seq: int, threads: int) -> int:
    """Peak resident memory (bytes) of a fresh process that loads ``model_dir`` and runs one forward."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(model_dir), str(seq), str(threads)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure_speed(spec, student, tok, examples, seq: int, student_dir: Path, reps: int = 9) -> dict:
    """Forward tokens/s and peak RSS of the pruned model against the unpruned one, side by side."""
    import torch

    tps = forward_speed({"unpruned": (spec, tok), "pruned": (student, tok)}, examples, seq, reps)
    threads = torch.get_num_threads()
    return {"tokens_per_s": tps["pruned"], "unpruned_tokens_per_s": tps["unpruned"],
            "speedup": tps["pruned"] / tps["unpruned"], "peak_rss": peak_rss(student_dir, seq, threads),
            "unpruned_peak_rss": peak_rss(student_dir.parent / "specialized", seq, threads)}


def reduce_once(spec, tok, data: dict, seq: int, keep: float, heal_steps: int, calibration, heal_items=None,
                vocabulary=None, **switches):
    """The daemon's reducer at one keep ratio, no back-off (a budget nothing fails): judged on the target
    held-out set as the daemon judges on its lineage's, the other domain watched alongside; the vocabulary
    trimmed to what ``vocabulary`` uses when it is given."""
    import math

    from learners.reduce import ReductionData, Switches, reduce
    from policies.reduction import ReductionPolicy

    own = data["train"] + data["calib"]
    rd = ReductionData(calibration=list(calibration), heal=list(heal_items or own), gate={"target": data["held"]},
                       watch={"other": data["other_held"]}, vocabulary=vocabulary)
    policy = ReductionPolicy(every=0, keep=keep, budget=math.inf, max_tries=1)
    return reduce(spec, tok, rd, policy, Switches(max_seq_len=seq, batch_size=8, heal_steps=heal_steps, **switches))


def stages(t) -> dict:
    """A reducer try's perplexities, target and other, per stage (reconstructed: before its keep decision)."""
    out = {}
    for stage, gate in (("pruned", t.ppl_pruned), ("reconstructed", t.ppl_reconstructed), ("healed", t.ppl_healed)):
        if gate is not None:
            out[stage] = {"target": gate["target"], "other": t.watch[stage]["other"]}
    return out


def run_keep(keep: float, spec, tok, data: dict, seq: int, heal_steps: int, work: Path) -> dict:
    from learners.reduction import mlp_epochs

    own = data["train"] + data["calib"]  # what the lineage has seen: the daemon's calibration and healing data
    calibration = {"activation-target": own, "activation-other": data["other_calib"]}
    out, plan = {"methods": {}, **commit()}, None
    for method in METHODS:
        switches = {"importance": method.split("-")[0], "plan": plan}
        if method not in calibration:
            switches["reconstruct"] = "off"
        items = calibration.get(method, own)
        red = reduce_once(spec, tok, data, seq, keep, heal_steps, items, **switches)
        (t,) = red.record.tries
        if plan is None:  # the first method, activation-target, chooses the allocation for all four
            plan = red.record.plan
            out.update(plan=plan.label, keep_achieved=plan.keep_achieved, candidates=t.candidates)
            print(f"keep {keep}: allocations " + ", ".join(f"{k}={v:.3f}" for k, v in t.candidates.items())
                  + f" -> {plan.label}", flush=True)
        row = {**stages(t), "n_params": red.record.n_params_after, "refit_kept": t.refit_kept,
               "reconstruction_kept": t.reconstruction_kept, "mlp_epochs": mlp_epochs(len(items)),
               "prune_seconds": t.seconds["prune"],  # importance, allocation and refit; reconstruct_seconds includes it
               "reconstruct_seconds": t.seconds["prune"] + t.seconds["reconstruct"], "heal_seconds": t.seconds["heal"]}
        if method == "activation-target":
            row["bytes"] = file_bytes(red.model, tok, work / f"keep{keep}")
            out["speed"] = measure_speed(spec, red.model, tok, data["held"][:8], seq, work / f"keep{keep}")
        out["methods"][method] = row
        steps = [row[k] for k in ("pruned", "reconstructed", "healed") if k in row]
        print(f"  {method}: ppl target / other " + " -> ".join(f"{p['target']:.2f} / {p['other']:.2f}" for p in steps),
              flush=True)
        del red
    return out


def run_calibration(sizes: list[int], keep: float, spec, tok, data: dict, seq: int, heal_steps: int,
                    mlp_item_passes: int | None = None) -> list[dict]:
    """The target-domain method at ``keep`` with the first ``n`` of the lineage's items for importance,
    allocation, reconstruction and healing, for each ``n`` in ``sizes`` (the first ``n`` = the 176 of the
    keep table; the rest are further Python items from other documents than the held-out ones), the MLP
    training given ``mlp_item_passes`` (default: the daemon's budget)."""
    from learners.reduction import MLP_ITEM_PASSES, mlp_epochs

    passes = MLP_ITEM_PASSES if mlp_item_passes is None else mlp_item_passes

    own = data["train"] + data["calib"]
    seen = {(e.prompt, e.response) for e in own}
    more = load_data(max(sizes) - len(data["calib"]), len(data["calib"]), len(data["held"]))
    assert [(e.prompt, e.response) for e in more["held"]] == [(e.prompt, e.response) for e in data["held"]]
    pool = own + [e for e in more["train"] + more["calib"] if (e.prompt, e.response) not in seen]
    rows = []
    for n in sizes:
        items = pool[:n]
        red = reduce_once(spec, tok, data, seq, keep, heal_steps, items, heal_items=items, mlp_item_passes=passes)
        (t,) = red.record.tries
        row = {"items": len(items), "plan": t.plan, **stages(t), **commit(), "refit_kept": t.refit_kept,
               "reconstruction_kept": t.reconstruction_kept, "mlp_epochs": mlp_epochs(len(items), passes),
               "prune_seconds": t.seconds["prune"],  # importance, allocation and refit; reconstruct_seconds includes it
               "reconstruct_seconds": t.seconds["prune"] + t.seconds["reconstruct"], "heal_seconds": t.seconds["heal"]}
        print(f"  calibration {len(items)} items ({t.plan}): ppl target / other "
              + " -> ".join(f"{row[k]['target']:.2f} / {row[k]['other']:.2f}"
                            for k in ("pruned", "reconstructed", "healed")), flush=True)
        rows.append(row)
        del red
    return rows


def run_cascade(base: Path, data: dict, seq: int, generations: int, work: Path, heal_steps: int) -> list[dict]:
    """gen-0 -> gen-1 -> ... through the real daemon: learn a batch, ``cascade reduce``, repeat."""
    from learners.update import evaluate_loss

    settings = {"base_model": base, "max_seq_len": seq, "learning_rate": 1e-3, "batch_size": 4,
                "reduce_every": 0, "reduce_keep": 0.85, "reduce_budget": 1.5, "heal_steps": heal_steps,
                "calibration_items": 32, "metrics_port": 0, "heldout_fraction": 0.1}
    daemon = Daemon(work / "cascade", settings, "daemon.log")
    recs = data["train_records"]
    per_gen = len(recs) // (generations + 1)
    rows = []

    def measure(label: str) -> dict:
        model, tok = live_model(daemon.home)
        n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" not in n_)
        row = {"generation": label, "n_params": n, **commit(),
               "ppl_target": ppl(evaluate_loss(model, tok, data["held"], seq)),
               "ppl_other": ppl(evaluate_loss(model, tok, data["other_held"], seq))}
        print(f"  cascade {label}: {row}", flush=True)
        return row

    try:
        for g in range(generations + 1):
            daemon.publish([{**r, "id": f"c{g}-{i}"} for i, r in enumerate(recs[g * per_gen:(g + 1) * per_gen])])
            daemon.wait_drained()
            lineage = daemon.home / "registry" / "main"
            before = (lineage / "CURRENT").read_text().strip()
            rows.append(measure(before))
            if g == generations:
                break
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "daemon.cli", "reduce", "--lineage", "main"], env=daemon.env,
                           check=True, capture_output=True)
            while (lineage / "CURRENT").read_text().strip() == before:
                if daemon.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited: see {daemon.home}")
                if time.monotonic() - t0 > 3600:
                    raise TimeoutError("no new generation within an hour (a rejected reduction?)")
                time.sleep(2)
            card = json.loads((lineage / (lineage / "CURRENT").read_text().strip() / "card.json").read_text())
            rows[-1]["reduction_seconds"] = time.monotonic() - t0
            rows[-1]["next"] = {"parent": card["parent"], "plan": card["reduction"]["gate"]["tries"][-1]["plan"],
                                "keep_achieved": card["reduction"]["keep_achieved"]}
    finally:
        daemon.stop()
    return rows


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    base = doc["specialized"]
    for ax, which in zip(axes, ["target", "other"]):
        for method in METHODS:
            pts = sorted((v["methods"][method]["n_params"], v["methods"][method]["healed"][which])
                         for v in doc["keeps"].values() if method in v["methods"])
            if pts:
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], "o-", label=method)
        ax.axhline(base["ppl"][which], color="k", ls="--", lw=1, label="unpruned (specialized)")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(f"held-out perplexity, {doc[which + '_domain']} (after healing)")
        ax.set_title(f"{which} domain: {doc[which + '_domain']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_tables(doc: dict) -> str:
    base = doc["specialized"]
    lines = [f"unpruned specialized model: {base['n_params']:,} parameters, {base['bytes'] / 2**20:.0f} MiB, "
             f"ppl {doc['target_domain']} {base['ppl']['target']:.2f} / {doc['other_domain']} {base['ppl']['other']:.2f}",
             "", f"| keep | shape | method | ppl {doc['target_domain']} pruned -> reconstructed -> healed | "
             f"ppl {doc['other_domain']} (same) | healed / unpruned (target) |", "|---|---|---|---|---|---|"]

    def path(m: dict, which: str) -> str:
        """Perplexity after each stage; a reconstruction the held-out set did not agree with is undone before
        healing (the daemon's rule) and marked."""
        def cell(k: str) -> str:
            if k not in m:
                return "-"
            undone = k == "reconstructed" and m.get("reconstruction_kept") is False
            return f"{m[k][which]:.2f}" + (" (undone)" if undone else "")
        return " -> ".join(cell(k) for k in ("pruned", "reconstructed", "healed"))

    note, marks = commit_marks(list(doc["keeps"].values()))
    lines.insert(2, note)
    lines.insert(3, "")
    for (keep, v), mark in zip(doc["keeps"].items(), marks):
        for method, m in v["methods"].items():
            lines.append(f"| {keep}{mark} | {v['plan']} | {method} | {path(m, 'target')} | {path(m, 'other')} | "
                         f"{m['healed']['target'] / base['ppl']['target']:.2f}x |")
    speeds = {k: v["speed"] for k, v in doc["keeps"].items() if "speed" in v}
    if speeds:
        lines += ["", "| keep | parameters | safetensors MiB | forward tokens/s (unpruned, same run) | speed-up | "
                  "peak RSS MiB (unpruned) |", "|---|---|---|---|---|---|"]
        for k, sp in speeds.items():
            m = doc["keeps"][k]["methods"]["activation-target"]
            lines.append(f"| {k} | {m['n_params']:,} ({m['n_params'] / base['n_params']:.2f}x) | "
                         f"{m['bytes'] / 2**20:.0f} ({base['bytes'] / 2**20:.0f}) | {sp['tokens_per_s']:.0f} "
                         f"({sp['unpruned_tokens_per_s']:.0f}) | {sp['speedup']:.2f}x | {sp['peak_rss'] / 2**20:.0f} "
                         f"({sp['unpruned_peak_rss'] / 2**20:.0f}) |")
    if doc.get("calibration"):
        cal = doc["calibration"]
        note, marks = commit_marks(cal["rows"])
        lines += ["", note, "", f"| keep {cal['keep']}: lineage items used | shape | ppl {doc['target_domain']} pruned -> "
                  "reconstructed -> healed | healed / unpruned | "
                  f"ppl {doc['other_domain']} healed | MLP epochs | reduction minutes |", "|---|---|---|---|---|---|---|"]
        for r, mark in zip(cal["rows"], marks):
            lines.append(f"| {r['items']}{mark} | {r['plan']} | {path(r, 'target')} | "
                         f"{r['healed']['target'] / base['ppl']['target']:.3f}x | {r['healed']['other']:.2f} | "
                         f"{r['mlp_epochs']} | {(r['reconstruct_seconds'] + r['heal_seconds']) / 60:.1f} |")
    if doc.get("cascade"):
        note, marks = commit_marks(doc["cascade"])
        lines += ["", note, "", f"| generation | parameters | ppl {doc['target_domain']} | ppl {doc['other_domain']} | "
                  "next: plan (keep achieved) | reduction minutes |", "|---|---|---|---|---|---|"]
        for r, mark in zip(doc["cascade"], marks):
            nxt = r.get("next")
            lines.append(f"| {r['generation']}{mark} | {r['n_params']:,} | {r['ppl_target']:.2f} | {r['ppl_other']:.2f} | "
                         + (f"{nxt['plan']} ({nxt['keep_achieved']:.3f}) | {r['reduction_seconds'] / 60:.1f} |"
                            if nxt else "- | - |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, few steps")
    ap.add_argument("--keeps", default="0.8,0.6,0.4")
    ap.add_argument("--skip-cascade", action="store_true")
    ap.add_argument("--cascade-only", action="store_true", help="only the cascade, added to an earlier run's JSON")
    ap.add_argument("--calibration", help="item counts for the calibration study (default 176,600; quick 24,48)")
    ap.add_argument("--mlp-item-passes", type=int,
                    help="the calibration study's MLP training budget in items (default: the daemon's, 2048)")
    ap.add_argument("--calibration-only", action="store_true",
                    help="only the calibration study, merged into an earlier run's JSON "
                         "(a row per item count and MLP epochs)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--table", metavar="JSON", help="only print the README tables of an earlier run")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown_tables(json.loads(Path(args.table).read_text())))
        return 0
    import torch
    from transformers import AutoTokenizer

    from learners.reduction import count_parameters
    from learners.update import evaluate_loss, load_causal_lm

    torch.set_num_threads(args.threads)
    q = args.quick
    seq = 64 if q else 128
    n_train, n_calib, n_held = (16, 8, 8) if q else (128, 48, 24)
    spec_steps, heal_steps = (4, 2) if q else (32, 24)
    base = foundation()
    tok = AutoTokenizer.from_pretrained(str(base))
    data = load_data(n_train, n_calib, n_held)
    suffix = "-quick" if q else ""
    work = Path(tempfile.mkdtemp(prefix="cascade-reduction-"))

    def eval_fn(model) -> dict[str, float]:
        return {"target": ppl(evaluate_loss(model, tok, data["held"], seq)),
                "other": ppl(evaluate_loss(model, tok, data["other_held"], seq))}

    if args.cascade_only:
        path = RESULTS / f"reduction{suffix}.json"
        doc = json.loads(path.read_text())
        doc["cascade"] = run_cascade(base, data, seq, 3, work, heal_steps)
        write_json(path.name, doc)
        print(markdown_tables(doc))
        return 0
    keeps = [float(k) for k in args.keeps.split(",")]
    sizes = [int(n) for n in (args.calibration or ("24,48" if q else "176,600")).split(",")]
    t0 = time.monotonic()
    spec = specialize(base, tok, data, spec_steps, seq)
    if args.calibration_only:
        path = RESULTS / f"reduction{suffix}.json"
        doc = json.loads(path.read_text())
        keep = keeps[len(keeps) // 2]
        rows = run_calibration(sizes, keep, spec, tok, data, seq, heal_steps, args.mlp_item_passes)
        earlier = doc.get("calibration") or {}
        if earlier.get("keep") == keep:  # a row per item count and MLP epochs: new ones replace, the rest stay
            measured = {(r["items"], r["mlp_epochs"]) for r in rows}
            rows += [r for r in earlier["rows"] if (r["items"], r["mlp_epochs"]) not in measured]
        doc["calibration"] = {"keep": keep, "rows": sorted(rows, key=lambda r: (r["items"], -r["mlp_epochs"]))}
        write_json(path.name, doc)
        print(markdown_tables(doc))
        return 0
    doc = {"target_domain": TARGET, "other_domain": OTHER, "max_seq_len": seq, "threads": args.threads,
           "sizes": {"train": n_train, "calibration": n_calib, "heldout": n_held},
           "specialize_steps": spec_steps, "heal_steps": heal_steps,
           "foundation": {"ppl": eval_fn(load_causal_lm(base))},
           "specialized": {"ppl": eval_fn(spec), "n_params": count_parameters(spec),
                           "bytes": file_bytes(spec, tok, work / "specialized")},
           "keeps": {}, "cascade": []}
    print(f"foundation {doc['foundation']['ppl']}, specialized {doc['specialized']['ppl']} "
          f"({time.monotonic() - t0:.0f} s)", flush=True)

    def save() -> None:
        write_json(f"reduction{suffix}.json", doc)
        plot(doc, RESULTS / f"reduction{suffix}.png")

    for keep in keeps:
        doc["keeps"][str(keep)] = run_keep(keep, spec, tok, data, seq, heal_steps, work)
        save()
    keep = keeps[len(keeps) // 2]
    doc["calibration"] = {"keep": keep, "rows": run_calibration(sizes, keep, spec, tok, data, seq, heal_steps,
                                                                          args.mlp_item_passes)}
    save()

    del spec

    if not args.skip_cascade:
        doc["cascade"] = run_cascade(base, data, seq, 3, work, heal_steps)
        save()
    print(markdown_tables(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
