"""Specialists: a lineage tree grown from the foundation, every specialist reduced, against main.

On the SmolLM2-135M foundation (``main/gen-0000``):

1. ``code`` is forked from ``main/gen-0000`` and learns Python, Rust and C interactions mixed, then is
   reduced into ``code/gen-0001`` (merge, prune, heal, gate);
2. ``code-python`` and ``code-c`` are forked from that reduced precursor; each learns fresh
   interactions of its own language only, then is reduced in turn.

Each specialist's live model after its reduction (its current generation, a smaller dense checkpoint,
with the fresh adapter a promotion starts; or, where the gate rejected the reduction, the generation it
forked plus its adapter) is evaluated on its niche's held-out files (never streamed: other files of the same corpora) against
``main/gen-0000`` on the same data; sizes are parameters and safetensors bytes. Target: every
specialist smaller than main and better than main on its niche.

It drives ``LineageWorker`` and ``fork_lineage`` in-process: the objects a learner actor and the
``fork`` command call, with the daemon's default settings but the benchmark's learning rate
(``bench.continual``). The tree picture is ``cascade generations --png`` of the benchmark's registry.

Usage: ``python -m bench.specialists [--quick]``; writes bench/results/specialists.json, specialists.png
and specialists-tree.png.
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path
from statistics import geometric_mean

from bench.common import RESULTS, foundation, live_model, run_line, safetensors_bytes, write_json
from bench.continual import LEARNING_RATE, load_data

# lineage -> (parent generation it forks from, the domains it learns and is judged on)
TREE = {
    "code": ("main/gen-0000", ["python", "rust", "c"]),
    "code-python": ("code/CURRENT", ["python"]),
    "code-c": ("code/CURRENT", ["c"]),
}


def interactions(recs: list[dict], start: int):
    from daemon.schema import Interaction

    return [Interaction(entry_id=f"{start + i}-0", id=r["id"], prompt=r["prompt"], response=r["response"],
                        meta=r["meta"]) for i, r in enumerate(recs)]


def niche_ppl(home: Path, lineage: str, held: dict, domains: list[str], seq: int) -> dict[str, float]:
    """Held-out perplexity of the lineage's live model (current generation, plus its adapter if any)."""
    from learners.update import evaluate_loss

    model, tok = live_model(home, lineage)
    out = {d: math.exp(evaluate_loss(model, tok, held[d], seq, 8)) for d in domains}
    out["niche"] = geometric_mean([out[d] for d in domains])
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["specialists"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    x = range(len(names))
    a1.bar([i - 0.2 for i in x], [doc["specialists"][n]["main_ppl"]["niche"] for n in names], 0.4, label="main (gen-0000)")
    a1.bar([i + 0.2 for i in x], [doc["specialists"][n]["ppl"]["niche"] for n in names], 0.4, label="specialist")
    a1.set_xticks(list(x), names)
    a1.set_ylabel("held-out perplexity on its niche")
    a1.legend(fontsize=8)
    a2.bar(["main"] + names, [doc["main"]["n_params"] / 1e6] + [doc["specialists"][n]["n_params"] / 1e6 for n in names],
           color=["0.6"] + ["C1"] * len(names))
    a2.set_ylabel("parameters (M)")
    fig.suptitle("specialists grown from the foundation, each reduced once")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, written to specialists-quick.*")
    args = ap.parse_args(argv)
    import torch

    from daemon.cli import draw_tree, generation_tree
    from daemon.config import Settings
    from daemon.forking import fork_lineage
    from daemon.foundation import ensure_foundation
    from daemon.lineage import LineageWorker
    from daemon.registry import Registry

    torch.set_num_threads(2)
    per_domain, heldout = (24, 6) if args.quick else (96, 16)
    train, held = load_data(per_domain, heldout)
    # The first half of each language's interactions feeds ``code``, the second half the narrower niche.
    half = per_domain // 2
    first = [r for d in TREE["code"][1] for r in train[d][:half]]
    random.Random(0).shuffle(first)
    streams = {"code": first, "code-python": train["python"][half:], "code-c": train["c"][half:]}
    home = Path(tempfile.mkdtemp(prefix="cascade-specialists-"))
    s = Settings(home=home, base_model=foundation(), learning_rate=LEARNING_RATE, max_seq_len=128, reduce_every=0,
                 window_steps=4, heldout_fraction=0.1, heal_steps=4 if args.quick else 20)
    registry = Registry(s.registry_root)
    ensure_foundation(registry.lineage("main"), s.base_model)
    main_dir = registry.lineage("main").current_dir()
    doc = {"settings": {"learning_rate": s.learning_rate, "max_seq_len": s.max_seq_len, "batch_size": s.batch_size,
                        "replay_ratio": s.replay_ratio, "reduce_keep": s.reduce_keep, "reduce_budget": s.reduce_budget,
                        "heal_steps": s.heal_steps, "window_steps": s.window_steps},
           "per_domain": per_domain, "heldout": heldout,
           "main": {"n_params": registry.lineage("main").card("gen-0000")["n_params"], "bytes": safetensors_bytes(main_dir)},
           "specialists": {}}
    all_domains = list(dict.fromkeys(d for _, ds in TREE.values() for d in ds))
    main_ppl = niche_ppl(home, "main", held, all_domains, s.max_seq_len)
    k = 0
    for lineage, (source, domains) in TREE.items():
        t0 = time.monotonic()
        src_lineage, src_gen = source.split("/")
        if src_gen == "CURRENT":
            src_gen = registry.lineage(src_lineage).current()
        fork_lineage(registry, f"{src_lineage}/{src_gen}", lineage)
        w = LineageWorker(s, lineage)
        its = interactions(streams[lineage], k)
        k += len(its)
        for i, rep in enumerate(w.learn_all(its)):
            print(f"{lineage}: window {i + 1}, train loss {rep.train_loss:.3f}"
                  f"{', rolled back' if rep.rollback else ''}", flush=True)
        learned = w.counters["interactions_learned"]
        red = w.reduce("benchmark")
        w.close()
        gen_dir = registry.lineage(lineage).current_dir()
        row = {"forked_from": f"{src_lineage}/{src_gen}", "domains": domains, "interactions": len(its),
               "learned": learned, "reduction": red.outcome, "generation": registry.lineage(lineage).current(),
               "n_params": registry.lineage(lineage).card(registry.lineage(lineage).current())["n_params"],
               "bytes": safetensors_bytes(gen_dir), "plan": (red.card or {}).get("reduction", {}).get("pruned"),
               "ppl": niche_ppl(home, lineage, held, domains, s.max_seq_len),
               "main_ppl": {**{d: main_ppl[d] for d in domains}, "niche": geometric_mean([main_ppl[d] for d in domains])}}
        row["smaller_than_main"] = row["n_params"] < doc["main"]["n_params"]
        row["better_than_main"] = row["ppl"]["niche"] < row["main_ppl"]["niche"]
        row["seconds"] = time.monotonic() - t0
        doc["specialists"][lineage] = row
        print(f"{lineage}: {red.outcome} {row['generation']}, {row['n_params']:,} params, niche ppl "
              f"{row['ppl']['niche']:.2f} vs main {row['main_ppl']['niche']:.2f} ({row['seconds']:.0f} s)", flush=True)
    doc["target_met"] = all(r["smaller_than_main"] and r["better_than_main"] for r in doc["specialists"].values())
    name = "specialists-quick" if args.quick else "specialists"
    doc["tree"] = generation_tree(registry, None)
    write_json(f"{name}.json", doc)
    plot(doc, RESULTS / f"{name}.png")
    draw_tree(doc["tree"], RESULTS / f"{name}-tree.png")
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    lines = ["| lineage | forked from | generation | parameters | vs main | niche ppl | main's ppl there |",
             "|---|---|---|---|---|---|---|"]
    m = doc["main"]["n_params"]
    for name, r in doc["specialists"].items():
        lines.append(f"| {name} ({'+'.join(r['domains'])}) | {r['forked_from']} | {r['generation']} | "
                     f"{r['n_params'] / 1e6:.1f}M | {r['n_params'] / m:.2f}x | {r['ppl']['niche']:.2f} | "
                     f"{r['main_ppl']['niche']:.2f} |")
    return "\n".join(lines + ["", run_line(doc)])


if __name__ == "__main__":
    raise SystemExit(main())
