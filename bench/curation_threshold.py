"""The near-duplicate threshold, chosen by what it catches and what it wrongly skips.

Every stream goes through the daemon's own :class:`learners.curation.Curator` (MinHash LSH, the
decisions ``exact,near,junk``) in windows of ``--window`` items, as a lineage judges them; no model is
involved, so the study takes a minute. For each threshold it reports:

* **what is learned of each copied template**: ``bench.curation``'s polluted stream copies 24 clean items
  (each copy one word of its prompt and one of its response away from its template, so two copies are
  two edits apart); of each template and its copies, ideally one is learned, whichever comes first.
  Also for the same stream with **slot copies** (each template's copies all vary the *same* word, as a
  template filled in again does: one edit apart);
* **clean items skipped**: of the polluted stream's other clean items, and of every real corpus the
  benchmarks draw (both suites of ``daemon.corpus.SUITES``, 160 interactions a source, mixed as one
  lineage's traffic), the share skipped as near-duplicates. Real corpora hold some real repeats
  (boilerplate changelog entries, license headers); the examples printed show what was skipped.

Usage: ``python -m bench.curation_threshold [--quick] [--seeds 0,1] [--thresholds 0.6,0.65,0.7,0.75,0.8]
[--shingles N]``; writes bench/results/curation-threshold[-shinglesN][-quick].json.
"""
from __future__ import annotations

import argparse
import random
from collections import Counter

from bench.common import commit, write_json
from bench.continual import load_data
from bench.curation import BASE, FILLERS, TEMPLATES, build_streams
from daemon.corpus import SUITES
from learners.curation import Candidate, Curator
from policies.curation import SHINGLE_WORDS, CurationConfig


def skipped(stream: list[dict], threshold: float, window: int, shingle_words: int = SHINGLE_WORDS) -> dict[str, str]:
    """id -> reason, for each item of ``stream`` the daemon's curation skips at ``threshold``."""
    curator = Curator(CurationConfig(decisions=("exact", "near", "junk"), threshold=threshold,
                                     shingle_words=shingle_words))
    out = {}
    for k in range(0, len(stream), window):
        part = stream[k:k + window]
        cands = [Candidate(r["id"], r["prompt"], r["response"], sources=(("domain", r["meta"]["domain"]),))
                 for r in part]
        out.update({r["id"]: s.reason for r, s in zip(part, curator.curate(cands)) if s is not None})
    return out


def slot_copies(polluted: list[dict], seed: int) -> list[dict]:
    """``polluted`` with every near-copy rewritten to vary one fixed word of its template's prompt and one of
    its response (the same positions for every copy of a template), in the same places of the stream."""
    rng = random.Random(seed)
    by_id = {r["id"]: r for r in polluted}
    slots: dict[str, tuple[int, int]] = {}
    out = []
    for r in polluted:
        if "-near" not in r["id"]:
            out.append(r)
            continue
        tid = r["id"].split("-near")[0]
        t = by_id[tid]
        p, q = t["prompt"].split(" "), t["response"].split(" ")
        i, j = slots.setdefault(tid, (rng.randrange(len(p)), rng.randrange(len(q))))
        p[i], q[j] = rng.choice(FILLERS), rng.choice(FILLERS)
        out.append({**r, "prompt": " ".join(p), "response": " ".join(q)})
    return out


def real_stream(seed: int, per_source: int) -> list[dict]:
    """Every source of every suite, ``per_source`` interactions each, shuffled together."""
    sources = sorted({d for suite in SUITES.values() for d in suite})
    train, _ = load_data(per_source, 6, seed, sources)
    items = [{**r, "meta": {"domain": d}} for d in sources for r in train[d]]
    random.Random(seed).shuffle(items)
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--thresholds", default="0.6,0.65,0.7,0.75,0.8")
    ap.add_argument("--window", type=int, default=16, help="items judged together (a lineage's window)")
    ap.add_argument("--per-source", type=int, default=160)
    ap.add_argument("--shingles", type=int, default=SHINGLE_WORDS,
                    help=f"words per shingle (default {SHINGLE_WORDS}, the daemon's); another writes its own JSON")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one seed, 32 interactions a source")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.per_source = "0", 32
    thresholds = [float(t) for t in args.thresholds.split(",")]
    doc = {"window": args.window, "per_source": args.per_source, "shingle_words": args.shingles,
           "thresholds": thresholds, "seeds": {},
           **commit()}
    for seed in (int(s) for s in args.seeds.split(",")):
        _, polluted, _, _ = build_streams(BASE, TEMPLATES, seed)
        streams = {"polluted": polluted, "polluted, slot copies": slot_copies(polluted, seed),
                   "real corpora": real_stream(seed, args.per_source)}
        rows = doc["seeds"][str(seed)] = {}
        for t in thresholds:
            row = rows[str(t)] = {}
            for name, stream in streams.items():
                skip = skipped(stream, t, args.window, args.shingles)
                templates = {r["id"].split("-near")[0] for r in stream if "-near" in r["id"]}
                group = [r["id"] for r in stream if r["id"].split("-near")[0] in templates]
                others = [r for r in stream if r["id"] not in templates and "-near" not in r["id"]
                          and not r["id"].startswith("junk-")]
                wrong = [r for r in others if skip.get(r["id"]) == "near_duplicate"]
                row[name] = {"templates": len(templates), "group_items": len(group),
                             "group_learned": sum(1 for i in group if i not in skip),
                             "clean": len(others), "clean_skipped_near": len(wrong),
                             "clean_skipped": dict(Counter(skip[r["id"]] for r in others if r["id"] in skip)),
                             "examples": [r["response"][:160] for r in wrong[:3]]}
            print(f"seed {seed} threshold {t}: " + "; ".join(
                f"{n}: learned {r['group_learned']} of {r['group_items']} items of {r['templates']} templates, "
                f"others skipped {r['clean_skipped_near']}/{r['clean']}" for n, r in row.items()), flush=True)
    suffix = ("" if args.shingles == SHINGLE_WORDS else f"-shingles{args.shingles}") + ("-quick" if args.quick else "")
    write_json(f"curation-threshold{suffix}.json", doc)
    print(markdown_table(doc))
    return 0


def markdown_table(doc: dict) -> str:
    def cell(name: str, key: str, total: str, t: float) -> str:
        rs = [doc["seeds"][s][str(t)][name] for s in doc["seeds"]]
        n, d = sum(r[key] for r in rs), sum(r[total] for r in rs)
        return f"{n} of {d}"

    lines = ["| threshold | items learned of the copied templates' groups (ideal: one per template) | the same, "
             "slot copies | other clean items of the polluted stream skipped | real-corpus items skipped as "
             "near-duplicates |", "|---|---|---|---|---|"]
    for t in doc["thresholds"]:
        lines.append(f"| {t:g} | {cell('polluted', 'group_learned', 'group_items', t)} | "
                     f"{cell('polluted, slot copies', 'group_learned', 'group_items', t)} | "
                     f"{cell('polluted', 'clean_skipped_near', 'clean', t)} | "
                     f"{cell('real corpora', 'clean_skipped_near', 'clean', t)} |")
    ideal = sum(doc["seeds"][s][str(doc["thresholds"][0])]["polluted"]["templates"] for s in doc["seeds"])
    return "\n".join(lines + ["", f"({ideal} templates over seeds {', '.join(doc['seeds'])}; commit "
                              f"{doc['commit'][:12]})"])


if __name__ == "__main__":
    raise SystemExit(main())
