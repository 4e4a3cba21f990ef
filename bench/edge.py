"""Edge benchmark: each generation as a GGUF file in llama.cpp, against transformers on the same machine.

For SmolLM2-135M (gen-0000) and reduced generations of it (keep 0.8 / 0.6 / 0.4 of the non-embedding
parameters, made by the daemon's reducer ``learners.reduce.reduce`` on Python data: its importance,
allocation search and least-squares refit, without reconstruction or healing; keep 0.6 also with the
vocabulary trimmed to the lineage's text, as CASCADE_REDUCE_VOCAB=on does), per GGUF type (f16, q8_0): file size, load time, llama.cpp prompt and
generation tokens/s on ``--threads`` threads, held-out perplexity against transformers fp32 (and the
share of positions whose greedy token agrees); transformers fp32 and bf16 generation tokens/s beside.

It also measures what rounding pruned MLP widths to a multiple of 32 (so that ``ffn_down`` quantizes,
instead of falling back to F16) costs against the old multiple of 8, at keep 0.6: held-out perplexity
after pruning, parameters, q8_0 file size and llama.cpp speed.

Not healed: healing (distillation) changes perplexities, not file sizes or speeds, and takes long on
2 cores. Run: ``python -m bench.edge`` (``--quick``: gen-0000 and keep 0.6 only, width only, 4 held-out items, no bf16).
Writes bench/results/edge.json and edge.png.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, foundation, safetensors_bytes, write_json

PROMPT_TOKENS, GEN_TOKENS = 128, 64
REPEATS = 3  # speeds are the best of this many runs: the machine is shared, and other work only slows a run down


def reduced(teacher, tok, keep: float, data: dict, seq: int, out: Path, plan=None, trim: bool = False) -> dict:
    """A generation reduced to ``keep`` by the daemon's reducer (``learners.reduce.reduce``: its allocation search
    unless ``plan`` fixes one, its least-squares refit where the gate set agrees, the vocabulary trimmed to the
    lineage's text when ``trim``; no reconstruction or healing), saved to ``out``."""
    import torch

    from bench.reduction import reduce_once

    own = data["train"] + data["calib"]  # what the lineage has seen: calibration, and the vocabulary it keeps
    red = reduce_once(teacher, tok, data, seq, keep, heal_steps=0, calibration=own, vocabulary=own if trim else None,
                      plan=plan, reconstruct="off")
    with torch.no_grad():
        red.model.save_pretrained(str(out), safe_serialization=True)
    red.tokenizer.save_pretrained(str(out))
    return {"plan": red.record.plan.label, "n_params": red.record.n_params_after, "vocab": red.model.config.vocab_size}


def hf_speed(model_dir: Path, prompt_ids: list[int], threads: int, dtype: str) -> dict:
    """transformers prompt tokens/s (one forward) and greedy generation tokens/s."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor([prompt_ids])
    prompt_s, gen_s = [], []
    with torch.no_grad():
        model(ids)  # warm-up
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            model(ids)
            prompt_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, do_sample=False)
            gen_s.append(time.perf_counter() - t0 - prompt_s[-1])
    n = out.shape[1] - ids.shape[1]
    return {"prompt_tokens_per_s": len(prompt_ids) / min(prompt_s), "generation_tokens_per_s": n / max(min(gen_s), 1e-9)}


def llama_speed(path: Path, prompt_ids: list[int], threads: int) -> dict:
    """llama.cpp load time, prompt tokens/s (one eval of the prompt) and greedy generation tokens/s."""
    from learners.export_check import load_llama

    t0 = time.perf_counter()
    llm = load_llama(path, n_ctx=PROMPT_TOKENS + GEN_TOKENS + 8, n_threads=threads, logits_all=False)
    load_s = time.perf_counter() - t0
    try:
        llm.eval(prompt_ids[:8])  # warm-up
        prompt_s, gen_s = [], []
        for _ in range(REPEATS):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt_ids)
            prompt_s.append(time.perf_counter() - t0)
            llm.reset()
            stamps = []
            for _ in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
                stamps.append(time.perf_counter())
                if len(stamps) == GEN_TOKENS:
                    break
            gen_s.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    finally:
        llm.close()
    return {"load_s": load_s, "prompt_tokens_per_s": len(prompt_ids) / min(prompt_s),
            "generation_tokens_per_s": 1 / min(gen_s)}


def measure(name: str, model_dir: Path, held: list[str], threads: int, work: Path, info: dict,
            hf_dtypes=("float32", "bfloat16"), types=("f16", "q8_0"), max_tokens: int = 256) -> dict:
    from transformers import AutoTokenizer

    from learners.export import export_gguf
    from learners.export_check import compare

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt_ids = tok(" ".join(held), add_special_tokens=False)["input_ids"][:PROMPT_TOKENS]
    row = {"name": name, **info, "safetensors_bytes": safetensors_bytes(model_dir),
           "transformers": {d: hf_speed(model_dir, prompt_ids, threads, d) for d in hf_dtypes}, "gguf": {}}
    for typ in types:
        t0 = time.perf_counter()
        rec = export_gguf(model_dir, work / f"{name}.{typ}.gguf", typ)
        export_s = time.perf_counter() - t0
        agreement = compare(rec.path, model_dir, held, max_tokens=max_tokens, n_threads=threads)
        row["gguf"][typ] = {"bytes": rec.bytes, "export_s": export_s, "fallback_tensors": len(rec.fallback),
                            **llama_speed(Path(rec.path), prompt_ids, threads), **agreement.to_json()}
        print(f"  {name} {typ}: {rec.bytes / 1e6:.1f} MB, ppl {agreement.ppl_gguf:.3f} vs fp32 "
              f"{agreement.ppl_reference:.3f} ({agreement.ppl_ratio:.4f}x), top-1 {agreement.top1_agreement:.3f}, "
              f"gen {row['gguf'][typ]['generation_tokens_per_s']:.1f} tok/s", flush=True)
    for d, v in row["transformers"].items():
        print(f"  {name} transformers {d} gen {v['generation_tokens_per_s']:.1f} tok/s", flush=True)
    return row


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["generations"]
    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    w = 0.38
    axes[0].bar([i - w / 2 for i in x], [r["gguf"]["f16"]["bytes"] / 1e6 for r in rows], w, label="f16")
    axes[0].bar([i + w / 2 for i in x], [r["gguf"]["q8_0"]["bytes"] / 1e6 for r in rows], w, label="q8_0")
    axes[0].set_ylabel("GGUF file (MB)")
    series = [("llama.cpp q8_0", lambda r: r["gguf"]["q8_0"]["generation_tokens_per_s"]),
              ("llama.cpp f16", lambda r: r["gguf"]["f16"]["generation_tokens_per_s"]),
              ("transformers fp32", lambda r: r["transformers"]["float32"]["generation_tokens_per_s"])]
    if all("bfloat16" in r["transformers"] for r in rows):
        series.append(("transformers bf16", lambda r: r["transformers"]["bfloat16"]["generation_tokens_per_s"]))
    for k, (label, f) in enumerate(series):
        axes[1].bar([i + (k - len(series) / 2 + 0.5) * 0.2 for i in x], [f(r) for r in rows], 0.2, label=label)
    axes[1].set_ylabel(f"greedy generation tokens/s ({doc['provenance']['threads']} threads)")
    axes[2].bar([i - w / 2 for i in x], [r["gguf"]["f16"]["ppl_ratio"] for r in rows], w, label="f16")
    axes[2].bar([i + w / 2 for i in x], [r["gguf"]["q8_0"]["ppl_ratio"] for r in rows], w, label="q8_0")
    axes[2].axhline(1.03, color="r", ls="--", lw=1, label="q8_0 target (3%)")
    axes[2].set_ylim(0.98, 1.04)
    axes[2].set_ylabel("held-out ppl, llama.cpp / transformers fp32")
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=20, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M generations as GGUF files in llama.cpp (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="gen-0000 and keep 0.6 only, 4 held-out items of 128 "
                   "tokens, no bf16")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from transformers import AutoTokenizer

    from bench.reduction import load_data
    from learners.update import load_causal_lm
    from policies.reduction import ModelShape, plan_reduction
    from learners.export_check import compare  # noqa: F401  (fails early without llama-cpp-python)

    torch.set_num_threads(args.threads)
    seq = 256
    n_held, max_tokens = (4, 128) if args.quick else (16, 256)
    data = load_data(n_train=32, n_calib=32 if args.quick else 64, n_held=n_held)
    held = [ex.prompt + ex.response for ex in data["held"]]
    base = foundation()
    t_start = time.perf_counter()
    rows, multiple = [], {}
    dtypes = ("float32",) if args.quick else ("float32", "bfloat16")
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        work = Path(tmp)
        print("gen-0000", flush=True)
        rows.append(measure("gen-0000", base, held, args.threads, work, {"plan": "unpruned"}, dtypes,
                            max_tokens=max_tokens))
        teacher, tok = load_causal_lm(base).eval(), AutoTokenizer.from_pretrained(str(base))
        keeps = [(0.6, False)] if args.quick else [(0.8, False), (0.6, False), (0.6, True), (0.4, False)]
        for keep, trim in keeps:
            name = f"keep-{keep}" + ("+vocab" if trim else "")
            print(name, flush=True)
            fixed = plan_reduction(ModelShape.of(teacher.config), keep) if args.quick else None
            info = reduced(teacher, tok, keep, data, seq, work / name, plan=fixed, trim=trim)
            rows.append(measure(name, work / name, held, args.threads, work, {"keep": keep, **info}, dtypes,
                                max_tokens=max_tokens))
        # What rounding the MLP width to 32 instead of 8 costs (keep 0.6, width only, the same importance).
        for m in (8, 32):
            name = f"keep-0.6-width{m}"
            print(name, flush=True)
            info = reduced(teacher, tok, 0.6, data, seq, work / name,
                           plan=plan_reduction(ModelShape.of(teacher.config), 0.6, multiple=m))
            r = measure(name, work / name, held, args.threads, work, info, hf_dtypes=(), types=("q8_0",),
                        max_tokens=max_tokens)
            multiple[m] = {"plan": info["plan"], "n_params": info["n_params"],
                           "ppl_fp32": r["gguf"]["q8_0"]["ppl_reference"], "ppl_q8_0": r["gguf"]["q8_0"]["ppl_gguf"],
                           "q8_0_bytes": r["gguf"]["q8_0"]["bytes"],
                           "q8_0_fallback_tensors": r["gguf"]["q8_0"]["fallback_tensors"],
                           "q8_0_generation_tokens_per_s": r["gguf"]["q8_0"]["generation_tokens_per_s"]}
    g0 = rows[0]
    k6 = next(r for r in rows if r["name"] == "keep-0.6")
    doc = {"benchmark": "edge", "quick": args.quick, "load_average_at_end": os.getloadavg(), "held_out_items": len(held),
           "prompt_tokens": PROMPT_TOKENS, "generation_tokens": GEN_TOKENS, "generations": rows,
           "width_multiple": multiple, "seconds": time.perf_counter() - t_start,
           "targets": {
               "q8_0_ppl_within_3pct_everywhere": all(abs(r["gguf"]["q8_0"]["ppl_ratio"] - 1) <= 0.03 for r in rows),
               "f16_ppl_within_1pct_everywhere": all(abs(r["gguf"]["f16"]["ppl_ratio"] - 1) <= 0.01 for r in rows),
               "q8_0_gen_speedup_vs_fp32_gen0000": g0["gguf"]["q8_0"]["generation_tokens_per_s"]
               / g0["transformers"]["float32"]["generation_tokens_per_s"],
               "keep06_q8_0_smaller": k6["gguf"]["q8_0"]["bytes"] < g0["gguf"]["q8_0"]["bytes"],
               "keep06_q8_0_size_ratio": k6["gguf"]["q8_0"]["bytes"] / g0["gguf"]["q8_0"]["bytes"],
               "keep06_q8_0_gen_speed_ratio": k6["gguf"]["q8_0"]["generation_tokens_per_s"]
               / g0["gguf"]["q8_0"]["generation_tokens_per_s"]}}
    print(write_json("edge.json", doc))
    plot(doc, RESULTS / "edge.png")
    print(doc["targets"], multiple)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
