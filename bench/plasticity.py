"""Plasticity: does a reduced generation learn a new domain as well as the model it came from?

On SmolLM2-135M a lineage specializes on Python standard-library sources (``bench.reduction``'s data and
``specialize``: a LoRA adapter, merged). Three models then each get a fresh LoRA adapter and the same plain
steps on a domain none of them saw (``--new``: Perl modules by default), evaluated on its held-out files
every ``--eval-every`` steps (``bench.adaptation``'s ``adapt``):

* ``gen-N``: the foundation the lineage started from;
* ``gen-N+1 unpruned``: the specialization merged, nothing pruned (keep 1.0);
* ``gen-N+1 reduced``: the same reduced by the daemon's reducer (``learners.reduce.reduce`` through
  ``bench.reduction.reduce_once``) at ``--keep`` (the daemon's ``CASCADE_REDUCE_KEEP``, 0.7), healed with
  the daemon's default steps on the lineage's items;
* ``gen-N+1 reduced+regrow``: that reduced model with ``--regrow`` (0.25) of its pruned MLP width given
  back as fresh units that write nothing yet (``learners.reduction.regrow``, what the reducer does with
  ``CASCADE_REDUCE_REGROW``): the remedy, on and off side by side.

For each, per seed (the adapter's initialization and the order of the batches): the held-out loss curve
on the new domain, the steps to reach the target (the unpruned model's best loss in that seed, and 90% of
its gain), and what it keeps of the niche (Python held-out loss before and after the new steps). Side by
side in one run.

Usage: ``python -m bench.plasticity [--quick] [--new perl] [--seeds 0,1] [--keep 0.7]``; writes
bench/results/plasticity[-quick].json and .png.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, foundation, run_line, write_json



def new_domain(domain: str, n_train: int, n_held: int, seed: int) -> tuple[list, list]:
    """Train and held-out items of ``domain``, split by document."""
    from bench.continual import load_data
    from learners.data import Example

    train, held = load_data(n_train, n_held, seed, [domain])
    return ([Example(id=r["id"], prompt=r["prompt"], response=r["response"], domain=domain) for r in train[domain]],
            held[domain])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, few steps")
    ap.add_argument("--new", default="perl", help="the domain none of the models saw (daemon.corpus.SOURCES)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--keep", type=float, help="share of the body kept (default: the daemon's CASCADE_REDUCE_KEEP)")
    ap.add_argument("--regrow", type=float, default=0.25, help="share of the pruned MLP width regrown (the remedy)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of the new domain's steps")
    ap.add_argument("--eval-every", type=int, default=2)
    args = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from bench.adaptation import adapt, steps_to
    from bench.reduction import load_data, reduce_once, specialize
    from daemon.config import Settings
    from learners.reduction import count_parameters, regrow
    from learners.update import UpdateConfig

    torch.set_num_threads(2)
    if args.keep is None:
        args.keep = Settings.model_fields["reduce_keep"].default
    q, every = args.quick, args.eval_every
    seq = 64 if q else 128
    n_train, n_calib, n_held = (16, 8, 8) if q else (128, 48, 24)
    spec_steps = 4 if q else 32
    heal_steps = 2 if q else Settings.model_fields["heal_steps"].default  # the daemon's default
    new_n, new_held, steps = (16, 8, 4) if q else (64, 16, 24)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = foundation()
    tok = AutoTokenizer.from_pretrained(str(base))
    niche = load_data(n_train, n_calib, n_held)
    train, held = new_domain(args.new, new_n, new_held, 0)
    work = Path(tempfile.mkdtemp(prefix="cascade-plasticity-"))
    t0 = time.monotonic()
    spec = specialize(base, tok, niche, spec_steps, seq)
    spec.save_pretrained(str(work / "unpruned"), safe_serialization=True)
    tok.save_pretrained(str(work / "unpruned"))
    own = niche["train"] + niche["calib"]  # what the lineage has seen: the daemon's calibration and healing data
    out = reduce_once(spec, tok, niche, seq, args.keep, heal_steps, own)
    out.model.save_pretrained(str(work / "reduced"), safe_serialization=True)
    out.tokenizer.save_pretrained(str(work / "reduced"))
    units = out.record.regrow_units(args.regrow)
    grown = regrow(out.model, units)
    grown.save_pretrained(str(work / "regrown"), safe_serialization=True)
    out.tokenizer.save_pretrained(str(work / "regrown"))
    models = {"gen-N": base, "gen-N+1 unpruned": work / "unpruned", "gen-N+1 reduced": work / "reduced",
              "gen-N+1 reduced+regrow": work / "regrown"}
    doc = {"niche": "python", "new_domain": args.new, "keep": args.keep, "keep_achieved": out.record.plan.keep_achieved,
           "regrow": args.regrow, "regrown_units": units,
           "n_params": {"gen-N+1 unpruned": out.record.n_params_before, "gen-N+1 reduced": out.record.n_params_after,
                        "gen-N+1 reduced+regrow": count_parameters(grown)},
           "specialize_steps": spec_steps, "heal_steps": heal_steps, "new_items": len(train), "heldout": len(held),
           "steps": steps, "learning_rate": args.lr, "eval_every": every, "seeds": seeds,
           "prepare_seconds": time.monotonic() - t0, "runs": {}}
    del spec, out, grown
    for seed in seeds:
        cfg = UpdateConfig(max_seq_len=seq, batch_size=8, learning_rate=args.lr, constraints=frozenset(), seed=seed)
        runs = doc["runs"][str(seed)] = {}
        for name, path in models.items():
            t0 = time.monotonic()
            losses, learner = adapt(path, tok, None, train, held, steps, cfg, every, seed)
            runs[name] = {"curve": losses, "niche_after": learner.evaluate(niche["held"]),
                          "seconds": time.monotonic() - t0}
            print(f"seed {seed} {name}: {' '.join(f'{x:.3f}' for x in losses)}; niche after "
                  f"{runs[name]['niche_after']:.3f}", flush=True)
            del learner
        target = min(runs["gen-N+1 unpruned"]["curve"])  # the unpruned model's best: the bar for the reduced one
        target_90 = runs["gen-N+1 unpruned"]["curve"][0] - 0.9 * (runs["gen-N+1 unpruned"]["curve"][0] - target)
        for r in runs.values():
            r["steps_to_best"] = steps_to(r["curve"], target, every)
            r["steps_to_90"] = steps_to(r["curve"], target_90, every)
        write_json(f"plasticity{'-quick' if q else ''}.json", doc)  # after every seed: a long run keeps what it has
    doc["niche_before"] = niche_losses(models, tok, niche["held"], seq)
    write_json(f"plasticity{'-quick' if q else ''}.json", doc)
    plot(doc, RESULTS / f"plasticity{'-quick' if q else ''}.png")
    print(markdown_table(doc))
    return 0


def niche_losses(models: dict, tok, held, seq: int) -> dict[str, float]:
    """Each model's niche held-out loss before any new step (what it knows of the niche to keep)."""
    from learners.update import evaluate_loss, load_causal_lm

    return {name: evaluate_loss(load_causal_lm(path), tok, held, seq) for name, path in models.items()}


def markdown_table(doc: dict) -> str:
    lines = [f"| model (seed) | new-domain loss at 0 | best (steps) | at {doc['steps']} steps | gain in {doc['steps']} "
             "steps | steps to the unpruned model's best | to 90% of its gain | niche loss before | after |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seed, runs in doc["runs"].items():
        for name, r in runs.items():
            c = r["curve"]
            best = min(range(len(c)), key=c.__getitem__)
            never = lambda v: "never" if v is None else str(v)  # noqa: E731
            lines.append(f"| {name} ({seed}) | {c[0]:.3f} | {c[best]:.3f} ({best * doc['eval_every']}) | {c[-1]:.3f} | "
                         f"{c[0] - c[-1]:.3f} | "
                         f"{never(r['steps_to_best'])} | {never(r['steps_to_90'])} | "
                         f"{doc.get('niche_before', {}).get(name, float('nan')):.3f} | {r['niche_after']:.3f} |")
    return "\n".join(lines + ["", run_line(doc)])


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, runs in doc["runs"].items():
        for (name, r), color in zip(runs.items(), ("grey", "tab:blue", "tab:orange", "tab:green")):
            ax.plot([i * doc["eval_every"] for i in range(len(r["curve"]))], r["curve"], color=color,
                    ls="-" if seed == str(doc["seeds"][0]) else "--", label=f"{name} (seed {seed})")
    ax.set_xlabel(f"LoRA steps on {doc['new_domain']} (batch 8, lr {doc['learning_rate']:g})")
    ax.set_ylabel(f"held-out loss on {doc['new_domain']} (nats/token)")
    ax.set_title(f"plasticity: reduced (keep {doc['keep']}) vs unpruned vs the foundation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
