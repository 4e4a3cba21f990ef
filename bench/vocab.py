"""Vocabulary trimming on SmolLM2-135M specialized to Python, alone and after pruning to keep 0.6.

The model is specialized and reduced as in ``bench.reduction`` (same data and steps, the daemon's reducer
``learners.reduce.reduce`` with activation-target scores). Then each of the unpruned and the pruned model
is trimmed (``learners.vocab``) to the tokens of the lineage's own 176 items, and of 600 and 1,900
Python items from documents other than the held-out ones (about what a full default replay buffer
holds). For every model, side by side: parameters, safetensors bytes, held-out loss in bits per byte of
text (comparable across tokenizers) and per-token perplexity on Python and on man pages, CPU forward
speed in text bytes per second (interleaved repetitions, median) and peak RSS of a fresh process; for
every trim, the share of held-out tokens its vocabulary still has.

The trims here are unconditional: each row applies ``learners.vocab.trim_vocabulary`` (the function the
reducer's vocabulary step calls) so that what every trim costs is measured, including the ones the
daemon's reducer would drop; the reducer itself keeps a trim only when the reduction, trim included,
still passes its gate per byte of text (``learners.reduce``, step 6), which ``bench.edge``'s
"keep 0.6 + vocabulary" row runs end to end.

Usage: ``python -m bench.vocab [--quick] [--threads N]``; writes bench/results/vocab[-quick].json.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from bench.common import foundation, ppl, run_line, write_json
from bench.reduction import file_bytes, forward_speed, load_data, peak_rss, reduce_once, specialize


def replay_items(n: int, held) -> list:
    """``n`` Python items, as a long-lived lineage's replay would hold, from documents other than the
    held-out ones."""
    from daemon.corpus import interactions, python_docs
    from learners.data import Example

    held_docs = {ex.prompt.split("\n", 1)[0] for ex in held}
    out = []
    for doc in python_docs(n):
        if f"# {doc.name}" in held_docs:
            continue
        out += [Example(id=f"r{len(out) + i}", prompt=r["prompt"], response=r["response"], domain="python")
                for i, r in enumerate(interactions(doc, "python"))]
        if len(out) >= n:
            return out[:n]
    raise RuntimeError(f"only {len(out)} Python items found on this machine")


def coverage(tok, keep: set[int], examples) -> float:
    """Share of the tokens of ``examples`` (original tokenizer) that a trim to ``keep`` still has."""
    from learners.vocab import token_counts

    counts = token_counts(tok, examples)
    return sum(c for t, c in counts.items() if t in keep) / sum(counts.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, few steps")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from learners.reduction import count_parameters
    from learners.update import evaluate_loss
    from learners.vocab import kept_token_ids, token_counts, trim_vocabulary

    torch.set_num_threads(args.threads)
    q = args.quick
    seq = 64 if q else 128
    n_train, n_calib, n_held = (16, 8, 8) if q else (128, 48, 24)
    spec_steps, heal_steps, keep_ratio = (4, 2, 0.6) if q else (32, 24, 0.6)
    counts = (64,) if q else (600, 1900)  # 1900: about a full default replay buffer (2000)
    base = foundation()
    tok = AutoTokenizer.from_pretrained(str(base))
    data = load_data(n_train, n_calib, n_held)
    own = data["train"] + data["calib"]
    work = Path(tempfile.mkdtemp(prefix="cascade-vocab-"))

    seen = {f"{len(own)} (own)": own, **{str(n): replay_items(n, data["held"]) for n in counts}}
    t0 = time.monotonic()
    spec = specialize(base, tok, data, spec_steps, seq)
    red = reduce_once(spec, tok, data, seq, keep_ratio, heal_steps, own)  # the daemon's reducer, as bench.reduction
    pruned, plan = red.model, red.record.plan
    print(f"specialized and pruned to {plan.label} ({time.monotonic() - t0:.0f} s)", flush=True)

    models = {"unpruned": (spec, tok), f"keep {keep_ratio}": (pruned, tok)}
    doc = {"target_domain": "python", "other_domain": "man", "max_seq_len": seq, "threads": args.threads,
           "keep": keep_ratio, "plan": plan.label, "vocab_before": len(tok), "trims": {}, "models": {}}
    for label, items in seen.items():
        t0 = time.monotonic()
        keep = kept_token_ids(tok, token_counts(tok, items))
        kept = set(keep)
        doc["trims"][label] = {"items": len(items), "vocab": len(keep), "seconds": time.monotonic() - t0,
                               "coverage_target": coverage(tok, kept, data["held"]),
                               "coverage_other": coverage(tok, kept, data["other_held"])}
        print(f"vocabulary from {label} items: {doc['trims'][label]}", flush=True)
        for name in ("unpruned", f"keep {keep_ratio}"):
            models[f"{name} + vocabulary of {label}"] = trim_vocabulary(models[name][0], tok, keep)
    for name, (m, t) in models.items():
        where = work / name.replace(" ", "_")
        row = {"n_params": count_parameters(m), "bytes": file_bytes(m, t, where)}
        for which, held in (("target", data["held"]), ("other", data["other_held"])):
            row[f"bits_per_byte_{which}"] = evaluate_loss(m, t, held, seq, per_byte=True) / math.log(2)
            row[f"ppl_token_{which}"] = ppl(evaluate_loss(m, t, held, seq))
        row["peak_rss"] = peak_rss(where, seq, args.threads)
        doc["models"][name] = row
        print(f"  {name}: {row}", flush=True)
    speed = forward_speed(models, data["held"][:8], seq, 3 if q else 9, per_byte=True)
    for name, bps in speed.items():
        doc["models"][name]["bytes_per_s"] = bps
        doc["models"][name]["speedup"] = bps / speed["unpruned"]
    write_json(f"vocab{'-quick' if q else ''}.json", doc)
    print(markdown_table(doc))
    return 0


def markdown_table(doc: dict) -> str:
    lines = [f"| vocabulary from items | tokens kept (of {doc['vocab_before']:,}) | held-out tokens still in it: "
             f"{doc['target_domain']} / {doc['other_domain']} |", "|---|---|---|"]
    for label, t in doc["trims"].items():
        lines.append(f"| {label} | {t['vocab']:,} | {t['coverage_target']:.2%} / {t['coverage_other']:.2%} |")
    lines += ["", f"| model | parameters | safetensors MiB | bits/byte {doc['target_domain']} | bits/byte "
              f"{doc['other_domain']} | forward bytes/s (speed-up) | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for name, r in doc["models"].items():
        lines.append(f"| {name} | {r['n_params']:,} | {r['bytes'] / 2**20:.0f} | {r['bits_per_byte_target']:.3f} | "
                     f"{r['bits_per_byte_other']:.3f} | {r['bytes_per_s']:,.0f} ({r['speedup']:.2f}x) | "
                     f"{r['peak_rss'] / 2**20:.0f} |")
    return "\n".join(lines + ["", run_line(doc)])


if __name__ == "__main__":
    raise SystemExit(main())
