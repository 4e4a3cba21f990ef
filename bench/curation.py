"""Curation on a polluted stream, through the real daemon, side by side with the clean stream it hides.

The stream is built from the continual benchmark's real corpora (the related suite: man pages, Python,
Rust, C; ``bench/continual.py`` ``load_data``), as production traffic arrives:

* **clean items**: ``BASE`` interactions of each source, except that one source (the first) arrives
  ``FLOOD`` times as often as the others - half of the polluted stream;
* **near-duplicates** (40% of the stream) of ``TEMPLATES`` clean items, each a copy with one word of its
  prompt and one of its response replaced (a template filled in again);
* **junk** (10%): markup soup, random bytes made valid UTF-8, one phrase repeated.

Configurations (each a fresh daemon at the defaults of ``bench.continual``'s ``default``; the clean
items are shuffled once, the pollution inserted between them, and each stream published in four parts,
the held-out loss of every source measured after each):

* ``clean``        - the clean items alone, ``CASCADE_CURATION=none`` (the reference);
* ``clean-reshuffled`` - the same items in another order: how far order alone moves the figures, the
  noise floor the 2% target is read against (the polluted stream keeps the clean items' order, its
  pollution inserted between them);
* ``uncurated``    - the polluted stream, ``CASCADE_CURATION=none`` (today's behaviour without curation);
* ``curated``      - the polluted stream at the default curation (exact, near, junk);
* ``curated+fair`` - the same with the per-source share (``fair``) on.

Reported: final average perplexity (over the sources' held-out sets), forgetting (a source's final loss
above the lowest it reached), optimizer steps, minutes, and what curation skipped by reason.
Targets (issue 28): curated within 2% of clean's final perplexity with at least 30% fewer steps than
uncurated, and uncurated measurably worse than clean.

Usage: ``python -m bench.curation [--quick] [--configs clean,uncurated,...] [--update]``; writes
bench/results/curation[-quick].json.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from bench.common import RESULTS, Daemon, commit, commit_marks, foundation, ppl, write_json
from bench.continual import LEARNING_RATE, NEW_PER_STEP, REPLAYED_PER_STEP, evaluate, load_data
from daemon.cli import fates
from daemon.corpus import SUITES

BASE = 16  # clean interactions of each source but the flooding one (256 polluted in all)
FLOOD = 5  # the flooding source arrives this many times as often
TEMPLATES = 24  # "a few dozen" items the near-duplicates copy
NEAR_SHARE, JUNK_SHARE = 0.4, 0.1
PARTS = 4
FILLERS = ("value", "system", "file", "result", "option", "number", "user", "default", "error", "list",
           "table", "entry", "buffer", "server", "record", "string", "window", "thread", "device", "page")


def near_copy(rec: dict, rng: random.Random, n: int) -> dict:
    """``rec`` with one word of its prompt and one of its response (a run of non-space characters, the
    whitespace around it kept) replaced by a filler word."""
    def swap(text: str) -> str:
        words = list(re.finditer(r"\S+", text))
        if not words:
            return rng.choice(FILLERS)
        w = rng.choice(words)
        return text[:w.start()] + rng.choice(FILLERS) + text[w.end():]

    return {**rec, "id": f"{rec['id']}-near{n}", "prompt": swap(rec["prompt"]), "response": swap(rec["response"])}


def junk_items(n: int, rng: random.Random, domains: list[str]) -> list[dict]:
    """Three kinds in turn: markup soup, random bytes decoded as UTF-8 (invalid sequences replaced),
    one phrase repeated."""
    tags = ["div", "span", "td", "tr", "b", "i", "a", "p", "li", "ul"]
    out = []
    for k in range(n):
        kind = k % 3
        if kind == 0:
            text = "".join(f"<{rng.choice(tags)} class=\"x{rng.randrange(9)}\">&nbsp;&#{rng.randrange(9000)};"
                           f"</{rng.choice(tags)}>{rng.choice(['', '|', '>>', '{{', '}}'])}" for _ in range(14))
        elif kind == 1:
            text = rng.randbytes(300).decode("utf-8", errors="replace").replace("\x00", "")
        else:
            text = " ".join([rng.choice(["click here to win", "buy now best price", "subscribe today free"])] * 24)
        out.append({"id": f"junk-{k}", "prompt": f"Continue:\n{text[:120]}", "response": text[120:] or text,
                     "meta": {"domain": domains[k % len(domains)]}})
    return out


def build_streams(base: int, templates: int, seed: int) -> tuple[list[dict], list[dict], dict, list[str]]:
    """(clean stream, polluted stream, held-out sets, sources); both streams shuffled with ``seed``."""
    domains = SUITES["related"]
    train, held = load_data(base * FLOOD, 16, seed, domains)
    clean = train[domains[0]] + [r for d in domains[1:] for r in train[d][:base]]
    rng = random.Random(seed)
    total = round(len(clean) / (1 - NEAR_SHARE - JUNK_SHARE))
    picked = rng.sample(clean, templates)
    near = [near_copy(picked[i % templates], rng, i) for i in range(round(NEAR_SHARE * total))]
    pollution = near + junk_items(total - len(clean) - len(near), rng, domains)
    random.Random(seed).shuffle(clean)
    random.Random(seed + 1).shuffle(pollution)
    return clean, interleave(clean, pollution, random.Random(seed + 2)), held, domains


def interleave(clean: list[dict], pollution: list[dict], rng: random.Random) -> list[dict]:
    """The pollution inserted at random places of the clean stream, the clean items' order kept: what the
    polluted and the clean runs learn of the clean items then differs by what the pollution does, not by
    the order the items come in (``clean-reshuffled`` measures what order alone does)."""
    at = set(rng.sample(range(len(clean) + len(pollution)), len(pollution)))
    rest_clean, rest_pollution = iter(clean), iter(pollution)
    return [next(rest_pollution) if i in at else next(rest_clean) for i in range(len(clean) + len(pollution))]


def run(name: str, settings: dict, stream: list[dict], held: dict, work: Path, seq: int) -> dict:
    t0 = time.monotonic()
    daemon = Daemon(work / name, settings, "daemon.log")
    rows = []
    try:
        size = -(-len(stream) // PARTS)
        for k in range(PARTS):
            daemon.publish(stream[k * size:(k + 1) * size])
            daemon.wait_drained()
            rows.append(evaluate(daemon.home, held, seq))
            print(f"  {name}: after part {k + 1}/{PARTS}: " + " ".join(f"{d}={v:.3f}" for d, v in rows[-1].items()),
                  flush=True)
        skipped = Counter(f[b"reason"].decode() for _, f in daemon.redis.xrange("cascade:interactions:skipped"))
        state = json.loads((daemon.home / "registry/main/live/state.json").read_text())
    finally:
        daemon.stop()
    final = rows[-1]
    forgetting = {d: final[d] - min(r[d] for r in rows) for d in final}
    return {"losses": rows, "avg_final_ppl": sum(ppl(v) for v in final.values()) / len(final),
            "avg_forgetting": sum(forgetting.values()) / len(forgetting), "forgetting": forgetting,
            "update_steps": state["update_steps"], "minutes": (time.monotonic() - t0) / 60, "arrived": len(stream),
            "fates": fates(state), "skipped_by_reason": dict(skipped), "settings": settings, **commit()}


def verdict(configs: dict) -> dict:
    """The issue's three targets, where the configurations they compare were run."""
    out = {}
    c, u, k = (configs.get(n) for n in ("clean", "uncurated", "curated"))
    if c and k:
        out["curated_ppl_vs_clean"] = k["avg_final_ppl"] / c["avg_final_ppl"]
    if u and k:
        out["curated_steps_saved"] = 1 - k["update_steps"] / max(1, u["update_steps"])
    if c and u:
        out["uncurated_ppl_vs_clean"] = u["avg_final_ppl"] / c["avg_final_ppl"]
    if c and configs.get("clean-reshuffled"):
        out["reshuffled_ppl_vs_clean"] = configs["clean-reshuffled"]["avg_final_ppl"] / c["avg_final_ppl"]
    return out


def markdown_table(doc: dict) -> str:
    rows = list(doc["configs"].items())
    note, marks = commit_marks([r for _, r in rows])
    lines = [f"{note}", "", "| config | items | avg final ppl | avg forgetting (nats) | steps | minutes | skipped |",
             "|---|---|---|---|---|---|---|"]
    for (name, r), mark in zip(rows, marks):
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped_by_reason"].items())) or "-"
        lines.append(f"| {name}{mark} | {r['arrived']} | {r['avg_final_ppl']:.3f} | {r['avg_forgetting']:.4f} | "
                     f"{r['update_steps']} | {r['minutes']:.1f} | {skipped} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few items a source")
    ap.add_argument("--configs", default="clean,clean-reshuffled,uncurated,curated,curated+fair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--update", action="store_true",
                    help="keep the configurations of the existing JSON that --configs does not rerun")
    args = ap.parse_args(argv)
    base, templates, seq = (4, 4, 96) if args.quick else (BASE, TEMPLATES, 128)
    clean, polluted, held, domains = build_streams(base, templates, args.seed)
    common = {"base_model": str(foundation()), "max_seq_len": seq, "learning_rate": LEARNING_RATE, "reduce_every": 0,
              "window_steps": 4, "metrics_port": 0, "seed": args.seed,
              "batch_size": NEW_PER_STEP + REPLAYED_PER_STEP}
    reshuffled = random.Random(args.seed + 3).sample(clean, len(clean))
    configs = {"clean": ({**common, "curation": "none"}, clean),
               "clean-reshuffled": ({**common, "curation": "none"}, reshuffled),
               "uncurated": ({**common, "curation": "none"}, polluted),
               "curated": (common, polluted),
               "curated+fair": ({**common, "curation": "exact,near,junk,fair"}, polluted)}
    name = "curation" + ("-quick" if args.quick else "") + (f"-s{args.seed}" if args.seed else "")
    path = RESULTS / f"{name}.json"
    doc = {"domains": domains, "flooding": domains[0], "clean_items": len(clean), "polluted_items": len(polluted),
           "templates": templates, "configs": {}}
    if args.update and path.exists():
        doc["configs"] = json.loads(path.read_text())["configs"]
    work = RESULTS.parent / ".work" / name
    for cfg in args.configs.split(","):
        if cfg not in configs:
            raise SystemExit(f"unknown configuration {cfg!r}: choose from {', '.join(configs)}")
        print(f"running {cfg} ({len(configs[cfg][1])} interactions)", flush=True)
        settings, stream = configs[cfg]
        doc["configs"][cfg] = run(cfg, settings, stream, held, work, seq)
        doc["verdict"] = verdict(doc["configs"])
        write_json(path.name, doc)
    print(markdown_table(doc))
    print(json.dumps(doc["verdict"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
