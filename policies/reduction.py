"""When to reduce a lineage, and how much of each structure to keep.

The reduction keeps ``keep`` of the *non-embedding* parameters. This policy takes it all from
MLP width, the same number of neurons in every layer so the result is a standard LlamaConfig
(attention heads and depth are kept). Back-off: when a reduced model fails its gate, the next try
keeps ``backoff`` more, up to ``max_tries`` tries.
"""
from __future__ import annotations

from dataclasses import dataclass


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

    def layer_params(self, intermediate: int | None = None) -> int:
        i = self.intermediate if intermediate is None else intermediate
        h, hd = self.hidden, self.head_dim
        attn = 2 * h * self.heads * hd + 2 * h * self.kv_heads * hd
        return attn + 3 * h * i + 2 * h

    def non_embedding(self, intermediate: int | None = None) -> int:
        return self.layers * self.layer_params(intermediate) + self.hidden  # + final norm

    def total(self, intermediate: int | None = None) -> int:
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.non_embedding(intermediate) + emb


@dataclass(frozen=True)
class ReductionPlan:
    keep_target: float
    intermediate: int
    keep_achieved: float
    n_params_before: int
    n_params_after: int


def plan_reduction(shape: ModelShape, keep: float, multiple: int = 8, min_share: float = 0.1) -> ReductionPlan:
    """MLP width that keeps ``keep`` of the non-embedding parameters (rounded to ``multiple``)."""
    if not 0 < keep <= 1:
        raise ValueError("keep must be in (0, 1]")
    target = keep * shape.non_embedding()
    fixed = shape.non_embedding(0)
    per_neuron = 3 * shape.hidden * shape.layers
    width = int(round((target - fixed) / per_neuron / multiple)) * multiple
    floor = max(multiple, int(shape.intermediate * min_share) // multiple * multiple)
    width = max(floor, min(shape.intermediate, width))
    return ReductionPlan(keep, width, shape.non_embedding(width) / shape.non_embedding(),
                         shape.total(), shape.total(width))


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
