"""Where an update window's time goes at the daemon's defaults.

``LineageWorker`` in-process (the object each learner actor wraps: the same curation, windows, replay,
distillation, gate and checkpoint, without Redis and Ray in between), SmolLM2-135M at every default
setting. First a warm-up lineage (gate off, half of the traffic held out) fills every source's
held-out set to ``CASCADE_HELDOUT_PER_DOMAIN`` items, as a lineage that has seen four sources for a
while holds them; the lineage is then restarted at the defaults and learns ``--windows`` windows of
the four sources' traffic mixed. Each window's :class:`daemon.reports.LearnReport` ``seconds`` (the
worker's phases, and the step's own from :class:`learners.update.StepReport`) are summed over the
measured windows and shown as seconds per window and shares of the window's time. What lies outside
the worker (the stream, the ledger's Redis round trips, Ray) is what ``bench.throughput`` measures
as the daemon with the bare loop's settings against the bare loop.

Each gate variant (``--gates``) starts from the same warm-up state and learns the same windows: the
default, sequential gate (``daemon/heldout.py``: a share of each source's items after every window, the
rest where the share leaves the verdict open) against every item after every window
(``CASCADE_GATE_FIRST_ITEMS=0``), side by side in one run, with each window's verdict and the held-out
losses the two end with.

Usage: ``python -m bench.window_profile [--windows 6] [--gates sequential,full] [--quick]``; writes
bench/results/window-profile[-quick].json.
"""
from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import foundation, run_line, write_json
from bench.continual import load_data

DOMAINS = ["man", "python", "rust", "c"]
ORDER = ["curate", "gate_before", "replay", "step.batch", "step.forward", "step.teacher", "step.head_loss",
         "step.backward", "step.optimizer", "gate_after", "checkpoint"]
WHAT = {"curate": "curation (the live model's loss on each new response)",
        "gate_before": "held-out losses before the window (cached; measured again when a held-out set changed)",
        "replay": "sampling the replayed rows and their stored predictions",
        "step.batch": "batch assembly: tokenize, pad, loss positions",
        "step.forward": "decoder forward, new and replayed rows",
        "step.teacher": "distillation targets: the generation's forward on replayed rows without a stored "
                        "prediction, and the top-k taken for the store",
        "step.head_loss": "output projection, loss and KL, and their backward, by chunks",
        "step.backward": "decoder backward (the LoRA gradients)",
        "step.optimizer": "clip, AdamW step, update cap",
        "gate_after": "held-out losses after the window (every try; the sequential gate's share, and the rest "
                      "where needed)",
        "checkpoint": "ledger, adapter, replay store, predictions, held-out sets written; live switched",
        "other": "the rest: bookkeeping between the phases"}


def interactions(records: list[dict], start: int):
    from daemon.schema import Interaction

    return [Interaction(entry_id=f"{start + i}-0", id=r["id"], prompt=r["prompt"], response=r["response"],
                        meta=r["meta"]) for i, r in enumerate(records)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=6, help="measured windows at the defaults")
    ap.add_argument("--gates", default="sequential,full", help="gate variants, side by side: sequential "
                    "(the default) and full (CASCADE_GATE_FIRST_ITEMS=0)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small held-out sets, 2 windows")
    args = ap.parse_args(argv)
    import torch

    from daemon.config import Settings
    from daemon.foundation import ensure_foundation
    from daemon.lineage import LineageWorker
    from daemon.registry import Registry

    windows = 2 if args.quick else args.windows
    per_domain = 8 if args.quick else Settings.model_fields["heldout_per_domain"].default
    # Each window is as many interactions as the learner asks for (as the driver sends them); at most a batch
    # of new rows a step, so this much traffic always suffices.
    most = windows * Settings.model_fields["batch_size"].default * Settings.model_fields["window_steps"].default
    # warm-up: half held out, so each source's set fills with 2x its size (and some slack for the hash)
    warm_n = 2 * per_domain + per_domain // 2
    live_n = -(-most // len(DOMAINS))
    train, _ = load_data(warm_n + live_n, 0, 0, DOMAINS)
    warm = [r for d in DOMAINS for r in train[d][:warm_n]]
    live = [r for d in DOMAINS for r in train[d][warm_n:]]
    random.Random(0).shuffle(warm)
    random.Random(1).shuffle(live)
    base = foundation()
    with tempfile.TemporaryDirectory() as home:
        common = {"home": Path(home) / "warm-up", "base_model": base, "metrics_port": 0, "reduce_every": 0,
                  "heldout_per_domain": per_domain}
        s = Settings(**common, gate=False, heldout_fraction=0.5)
        ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
        t0 = time.monotonic()
        w = LineageWorker(s, "main")
        w.learn_all(interactions(warm, 0))
        held = {d: len(v) for d, v in w.heldout_items.items()}
        w.close()
        print(f"warm-up: {len(warm)} interactions, held-out items {held} ({time.monotonic() - t0:.0f} s)",
              flush=True)

        variants = {}
        for gate in args.gates.split(","):
            home_v = Path(home) / f"run-{gate}"
            shutil.copytree(common["home"], home_v, symlinks=True)
            s = Settings(**{**common, "home": home_v}, **GATES[gate])  # every default else, as the daemon restarts
            variants[gate] = measure(LineageWorker(s, "main"), live, len(warm), windows)
    sizes = {n for v in variants.values() for n in v["window_sizes"]}
    doc = {"windows": windows, "interactions_per_window": sizes.pop() if len(sizes) == 1 else sorted(sizes),
           "heldout_items": held,
           "settings": {k: str(getattr(s, k)) for k in ("batch_size", "replay_ratio", "window_steps", "max_seq_len",
                                                         "constraints", "gate", "curation", "precision",
                                                         "gate_first_items", "gate_exact_every")},
           "threads": torch.get_num_threads(), "variants": variants}
    write_json(f"window-profile{'-quick' if args.quick else ''}.json", doc)
    print(markdown_table(doc))
    return 0


GATES = {"sequential": {}, "full": {"gate_first_items": 0}}


def measure(w, live: list[dict], start: int, windows: int) -> dict:
    """``windows`` windows of ``live`` learned by ``w``, each as many interactions as ``w`` asks for (its
    ``window_items()``, then each report's ``window``, as the driver sends them): phases summed, each
    window's verdict."""
    from learners.timing import Timings

    total, reports, sizes, offset, n = Timings(), [], [], 0, w.window_items()
    for i in range(windows):
        rep = w.learn(interactions(live[offset:offset + n], start + offset))
        sizes.append(n)
        offset, n = offset + n, rep.window
        phases = dict(rep.seconds)
        phases["other"] = max(0.0, rep.update_seconds - sum(phases.values()))
        reports.append({"update_seconds": rep.update_seconds, "seconds": phases, "steps": rep.steps,
                        "attempts": rep.attempts, "rollbacks": rep.rollbacks, "gate_items": rep.gate_items,
                        "learned": rep.learned, "deferred": rep.deferred, "tokens": rep.tokens})
        total.add(phases)
        print(f"window {i + 1}: {rep.update_seconds:.1f} s, {rep.steps} steps, learned {rep.learned}, "
              f"rollbacks {rep.rollbacks}, gate items {rep.gate_items}, "
              + " ".join(f"{k}={v:.1f}" for k, v in phases.items()), flush=True)
    heldout = dict(w.last_heldout)
    w.close()
    window_s = sum(r["update_seconds"] for r in reports)
    return {"window_seconds": window_s / windows, "heldout_loss": heldout,
            "gate_items_per_window": sum(r["gate_items"] for r in reports) / windows,
            "phases": {k: {"seconds_per_window": v / windows, "share": v / window_s}
                       for k, v in sorted(total.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99)},
            "window_sizes": sizes, "reports": reports}


def markdown_table(doc: dict) -> str:
    names = list(doc["variants"])
    v = doc["variants"]
    lines = [f"{doc['windows']} windows of {doc['interactions_per_window']} interactions, held-out items per "
             f"source {doc['heldout_items']}, {doc['threads']} threads. Seconds per window; share of the window in "
             "brackets.", "",
             "| phase | what | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    phases = [k for k in ORDER + ["other"] if any(k in v[n]["phases"] for n in names)]
    for k in phases:
        cells = [f"{v[n]['phases'][k]['seconds_per_window']:.2f} ({v[n]['phases'][k]['share']:.0%})"
                 if k in v[n]["phases"] else "" for n in names]
        lines.append(f"| {k} | {WHAT.get(k, '')} | " + " | ".join(cells) + " |")
    lines.append("| **window** | | " + " | ".join(f"**{v[n]['window_seconds']:.1f}**" for n in names) + " |")
    lines.append("| held-out items evaluated | | " + " | ".join(f"{v[n]['gate_items_per_window']:.0f}" for n in names)
                 + " |")
    lines.append("| tries refused | | " + " | ".join(str(sum(len(r["rollbacks"]) for r in v[n]["reports"]))
                                                  for n in names) + " |")
    lines.append("| held-out loss at the end | | " + " | ".join(
        ", ".join(f"{d} {x:.4f}" for d, x in sorted(v[n]["heldout_loss"].items())) for n in names) + " |")
    return "\n".join(lines + ["", run_line(doc)])


if __name__ == "__main__":
    raise SystemExit(main(argv=None))
