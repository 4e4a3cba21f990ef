"""Peak memory of one learner at the defaults on SmolLM2-135M, and what a step costs, side by side in one run.

Each variant runs in its own process (peak RSS is per process: ``ru_maxrss``): a ``ContinualLearner`` at the
daemon's defaults (batch 8 = 5 new + 3 replayed rows, 256 tokens, distillation on the replayed rows, fp32)
takes ``--steps`` steps on full-length rows, then evaluates them once (the gate's measurement). Variants:

* ``defaults``   - what the daemon runs: logits made a chunk of positions at a time, glibc's mmap threshold
                   pinned (``learners/allocator.py``);
* ``checkpointing`` - the same with ``CASCADE_ACTIVATION_CHECKPOINTING=on``;
* ``unpinned``   - the defaults without the pinned threshold (what the allocator alone costs).

Also recorded (after the peak is read): the tensors the decoder's forward keeps for the backward pass (saved-tensor hooks), the
losses (equal across variants: memory, not maths). Target (issue 27): peak <= 3 GB per learner.

``python -m bench.memory [--steps N]`` writes bench/results/memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import ROOT, foundation, write_json

VARIANTS = {"defaults": {}, "checkpointing": {"activation_checkpointing": True}, "unpinned": {"unpinned": True}}


def measure(variant: str, steps: int) -> dict:
    """Runs in the child process."""
    import resource

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    import learners.update as update
    from learners.data import Example, collate
    from learners.update import ContinualLearner, UpdateConfig

    opts = dict(VARIANTS[variant])
    if opts.pop("unpinned", False):
        update.pin_mmap_threshold = lambda *a, **k: False  # the learner calls it by this name

    base = foundation()
    tok = AutoTokenizer.from_pretrained(str(base))
    cfg = UpdateConfig(**opts)
    text = " ".join(f"word{i} is a token" for i in range(400))
    rows = [Example(id=f"x{i}", prompt="Tell me: ", response=text[i * 7:]) for i in range(cfg.batch_size)]
    n_replay = cfg.replay_count()
    learner = ContinualLearner(base, tok, cfg)

    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        rep = learner.step(rows[: cfg.batch_size - n_replay], rows[cfg.batch_size - n_replay:])
        times.append(time.perf_counter() - t0)
        losses.append(rep.loss)
    t0 = time.perf_counter()
    learner.evaluate(rows)
    eval_seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Then, outside the peak: what the decoder's forward keeps for the backward pass (hooks see every save).
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    decoder, _ = update.decoder_and_head(learner.model)
    b = collate(tok, rows, cfg.max_seq_len)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).last_hidden_state.sum()
    return {"peak_rss_mb": peak,
            "decoder_saved_mb": saved[0] / 2**20, "step_seconds": times, "eval_seconds": eval_seconds,
            "losses": losses, "tokens_per_row": int(b.attention_mask.sum(1).max())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return 0
    foundation()  # converted once, before the children time anything
    doc = {"steps": args.steps, "variants": {}}
    for name in VARIANTS:
        out = subprocess.run([sys.executable, "-m", "bench.memory", "--child", name, "--steps", str(args.steps)],
                             cwd=ROOT.parent, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
        doc["variants"][name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, json.dumps(doc["variants"][name]), flush=True)
    base = doc["variants"]["defaults"]
    doc["targets"] = {"peak <= 3 GB at the defaults": base["peak_rss_mb"] <= 3 * 1024}
    write_json("memory.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
