"""When to reduce a lineage, and how much of each structure to keep.

The reduction keeps ``keep`` of the *non-embedding* parameters. ``plan_candidates`` proposes ways
to spend that budget across MLP width, key/value groups and depth (the same counts in every block,
so the result is a standard LlamaConfig); the reduction measures each and keeps the best. Back-off:
when a reduced model fails its gate, the next try keeps ``backoff`` more, up to ``max_tries`` tries.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


# MLP widths are rounded to multiples of 32: llama.cpp's quantized types (q8_0, q4_0, ...) work on blocks of
# 32 values per row, and ffn_down of a width that is not a multiple stays in F16 in a GGUF export (a pruned
# SmolLM2 at width 1328 made a q8_0 file 7% larger than its parent's). Measured at keep 0.6 against rounding
# to 8: no held-out cost beyond the few neurons of rounding (docs/edge.md, bench/edge.py).
WIDTH_MULTIPLE = 32


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config) -> "ModelShape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))

    def reshaped(self, intermediate: int, kv_heads: int, layers: int) -> "ModelShape":
        """The same model with fewer neurons, KV groups (and their query heads) or blocks."""
        heads = kv_heads * (self.heads // self.kv_heads)
        return replace(self, intermediate=intermediate, kv_heads=kv_heads, heads=heads, layers=layers)

    def layer_params(self) -> int:
        h, hd = self.hidden, self.head_dim
        attn = 2 * h * self.heads * hd + 2 * h * self.kv_heads * hd
        return attn + 3 * h * self.intermediate + 2 * h

    def non_embedding(self) -> int:
        return self.layers * self.layer_params() + self.hidden  # + final norm

    def total(self) -> int:
        return self.non_embedding() + self.vocab * self.hidden * (1 if self.tied else 2)


@dataclass(frozen=True)
class ReductionPlan:
    """One allocation of a reduction: what the smaller model looks like."""

    keep_target: float
    intermediate: int
    kv_heads: int
    heads: int
    layers: int
    keep_achieved: float
    n_params_before: int
    n_params_after: int

    @property
    def label(self) -> str:
        return f"mlp{self.intermediate}-kv{self.kv_heads}-L{self.layers}"


def plan_reduction(shape: ModelShape, keep: float, kv_heads: int | None = None, layers: int | None = None,
                   multiple: int = WIDTH_MULTIPLE, min_share: float = 0.1) -> ReductionPlan | None:
    """The MLP width that, with ``kv_heads`` groups and ``layers`` blocks, keeps ``keep`` of the
    non-embedding parameters (rounded to ``multiple``); None when no width between ``min_share`` of
    the original and the original reaches it with those groups and blocks."""
    if not 0 < keep <= 1:
        raise ValueError("keep must be in (0, 1]")
    kv = shape.kv_heads if kv_heads is None else kv_heads
    n_layers = shape.layers if layers is None else layers
    fixed = shape.reshaped(0, kv, n_layers).non_embedding()
    per_neuron = 3 * shape.hidden * n_layers
    width = int(round((keep * shape.non_embedding() - fixed) / per_neuron / multiple)) * multiple
    floor = max(multiple, int(shape.intermediate * min_share) // multiple * multiple)
    if (width < floor or width > shape.intermediate) and (kv, n_layers) != (shape.kv_heads, shape.layers):
        return None  # this allocation cannot spend the budget: it is not a fair candidate
    width = max(floor, min(shape.intermediate, width))
    small = shape.reshaped(width, kv, n_layers)
    return ReductionPlan(keep, width, kv, small.heads, n_layers, small.non_embedding() / shape.non_embedding(),
                         shape.total(), small.total())


def plan_candidates(shape: ModelShape, keep: float, max_layer_share: float = 0.15) -> list[ReductionPlan]:
    """Allocations of the same budget between MLP width, KV groups and depth, to be measured.

    Width only; one KV group fewer; and 1, 2 and up to ``max_layer_share`` of the blocks fewer, the
    MLP width making up the rest. The reduction prunes each, measures it on calibration data and keeps
    the best (on SmolLM2 at keep 0.6, width only won: see the README's reduction benchmark).
    """
    max_drop = max(1, int(shape.layers * max_layer_share)) if shape.layers > 1 else 0
    drops = sorted({d for d in (0, 1, 2, max_drop) if d <= max_drop})
    combos = [(shape.kv_heads, shape.layers - d) for d in drops]
    if shape.kv_heads > 1:
        combos.insert(1, (shape.kv_heads - 1, shape.layers))
    plans = [plan_reduction(shape, keep, kv, n_layers) for kv, n_layers in combos]
    return [p for p in plans if p is not None]


@dataclass(frozen=True)
class ReductionPolicy:
    every: int  # interactions learned between automatic reductions; 0 = on command only
    keep: float
    budget: float  # allowed held-out perplexity ratio after/before, e.g. 1.15
    backoff: float = 0.1
    max_tries: int = 3

    def due(self, learned_since_reduction: int) -> bool:
        return self.every > 0 and learned_since_reduction >= self.every

    def keeps(self) -> list[float]:
        """The keep ratios to try, in order."""
        return [round(self.keep + i * self.backoff, 4) for i in range(self.max_tries)
                if self.keep + i * self.backoff < 1.0 - 1e-9]

    def passes(self, ppl_before: dict[str, float], ppl_after: dict[str, float]) -> tuple[bool, float]:
        """Worst perplexity ratio over the held-out sources, and whether it is within budget."""
        ratios = [ppl_after[d] / ppl_before[d] for d in ppl_before if d in ppl_after and ppl_before[d] > 0]
        worst = max(ratios) if ratios else 1.0
        return worst <= self.budget, worst
