"""The reducer: a teacher and its lineage's data in, a smaller model and a record of every choice out.

This is the one place a reduction is decided; the daemon (``daemon.lineage``) and every benchmark
call :func:`reduce` (the benchmarks with :class:`Switches` for their ablations), so what a benchmark
measures is by construction what the daemon runs. Read top to bottom, for each keep ratio the policy
offers (``policy.keeps()``, backing off when a try fails its gate):

1. **allocation**: every way ``plan_candidates`` spends the budget (MLP width / KV groups / depth) is
   pruned and measured on a probe of the calibration items (half of them, at most
   ``ALLOCATION_PROBE_ITEMS``); the lowest loss wins;
2. **refit**: the winner is pruned with the least-squares refit of ``down_proj`` / ``o_proj``
   (:func:`learners.reduction.prune` with Gram matrices) and without; the refit is kept only where
   the gate sets agree (it fits the calibration items and can overfit a few of them);
3. **reconstruction**: block-by-block least squares towards the teacher's residual stream
   (:func:`learners.reduction.reconstruct`), likewise kept only where the gate sets agree;
4. **healing**: distillation from the teacher on the heal items (:func:`learners.reduction.heal`);
5. **gate**: the worst held-out perplexity ratio to the teacher must stay within ``policy.budget``;
6. **regrowth** (``Switches.regrow``, off by default): a share of the pruned MLP width comes back as
   fresh units that write nothing yet (:func:`learners.reduction.regrow`), room for later learning;
7. **vocabulary** (when ``data.vocabulary`` is given): the tokens those items never use are trimmed,
   kept only when the reduction, trim included, still passes the gate (judged per byte of text).

The teacher is not modified. Nothing here touches the registry.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Literal, Sequence

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers imports torchvision

from learners.data import Example
from learners.reduction import (MLP_ITEM_PASSES, Importance, activation_importance, count_parameters, heal,
                                kept_blocks, magnitude_importance, prune, random_importance, reconstruct, regrow)
from learners.update import evaluate_loss
from learners.vocab import kept_token_ids, token_counts, trim_vocabulary
from policies.reduction import ModelShape, ReductionPlan, ReductionPolicy, plan_candidates

log = logging.getLogger("cascade.reduce")

Sets = dict[str, list[Example]]
Auto = Literal["auto", "on", "off"]  # auto: kept only where the gate sets agree


@dataclass
class ReductionData:
    """What a reduction learns from and is judged on."""

    calibration: list[Example]  # importance scores, the allocation probe, the least-squares reconstruction
    heal: list[Example]  # distilled on after pruning
    gate: Sets  # held-out items per source: every keep-or-drop decision and the gate
    vocabulary: list[Example] | None = None  # trim the tokens these never use (None: no trim)
    watch: Sets = field(default_factory=dict)  # measured after every stage, never judged (benchmarks)


@dataclass
class Switches:
    """How the steps run. The daemon's come from its settings (``Settings.reduction_switches``); benchmarks
    change one at a time."""

    max_seq_len: int
    batch_size: int  # rows per forward pass when scoring and measuring
    heal_steps: int
    bf16: bool = False
    heal_lr: float = 5e-5
    heal_batch: int = 4
    importance: Literal["activation", "magnitude", "random"] = "activation"
    refit: Auto = "auto"
    reconstruct: Auto = "auto"
    mlp_item_passes: int = MLP_ITEM_PASSES  # items each pruned MLP trains on, over its epochs (0: no training)
    plan: ReductionPlan | None = None  # a fixed allocation instead of measuring the candidates
    regrow: float = 0.0  # share of the pruned MLP width given back as fresh units (learners.reduction.regrow)
    on_heal_step: Callable[[object, int, int, float], None] | None = None  # (student, step, steps, kl)


@dataclass
class Try:
    """One keep ratio, from allocation to gate (perplexities per gate set)."""

    keep_target: float
    keep_achieved: float
    plan: str
    candidates: dict[str, float]  # probe loss of every allocation
    mlp_intermediate: int
    kv_heads: int
    layers: int
    ppl_cut: dict[str, float]  # plain pruning
    ppl_refitted: dict[str, float] | None  # pruning with the least-squares refit (None: not tried)
    refit_kept: bool | None  # None: no refit possible (data-free scores) or switched off
    ppl_pruned: dict[str, float]  # after the refit decision
    ppl_reconstructed: dict[str, float] | None
    reconstruction_kept: bool | None
    ppl_healed: dict[str, float]
    worst_ratio: float
    passed: bool
    heal_final_kl: float | None
    seconds: dict[str, float] = field(default_factory=dict)  # prune (allocation + refit), reconstruct, heal
    watch: dict[str, dict[str, float]] = field(default_factory=dict)  # stage (as the ppl_* fields) -> set -> ppl

    @property
    def ppl_before_healing(self) -> dict[str, float]:
        return self.ppl_reconstructed if self.reconstruction_kept else self.ppl_pruned

    def card(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "watch"}


@dataclass
class ReductionRecord:
    """Every choice a reduction made, for the generation card and the benchmarks."""

    shape: ModelShape  # the teacher's
    importance: str
    calibration_items: int
    heal_items: int
    heal_steps: int
    budget: float
    n_params_before: int
    ppl_before: dict[str, float]
    watch_before: dict[str, float] = field(default_factory=dict)
    tries: list[Try] = field(default_factory=list)
    plan: ReductionPlan | None = None  # the passing try's allocation
    n_params_after: int | None = None
    vocabulary: dict | None = None
    ppl_after: dict[str, float] = field(default_factory=dict)  # the result's, trim included
    regrown: int = 0  # fresh MLP units added to every block after the gate (Switches.regrow)

    @property
    def passed(self) -> bool:
        return self.plan is not None

    def regrow_units(self, share: float) -> int:
        """Fresh MLP units a block gets back for ``share`` of the width the passing plan pruned."""
        return round(share * (self.shape.intermediate - self.plan.intermediate))

    def card(self, trigger: str, merged_adapter: dict, keep_target: float) -> dict:
        """The ``reduction`` section of the generation card."""
        plan, shape = self.plan, self.shape
        return {
            "trigger": trigger,
            "merged_adapter": merged_adapter,
            "importance": IMPORTANCE_TEXT.get(self.importance, self.importance),
            "reconstruction": RECONSTRUCTION_TEXT,
            "calibration_items": self.calibration_items,
            "heal_items": self.heal_items,
            "pruned": {"mlp_intermediate": [shape.intermediate, plan.intermediate],
                       "attention_heads": [shape.heads, plan.heads], "kv_heads": [shape.kv_heads, plan.kv_heads],
                       "layers": [shape.layers, plan.layers]},
            "keep_target": keep_target,
            "keep_achieved": round(plan.keep_achieved, 4),
            "n_params_before": self.n_params_before,
            "n_params_after": self.n_params_after,
            "non_embedding_before": shape.non_embedding(),
            "non_embedding_after": shape.reshaped(plan.intermediate, plan.kv_heads, plan.layers).non_embedding(),
            "heal_steps": self.heal_steps,
            "gate": {"budget_ppl_ratio": self.budget, "ppl_before": self.ppl_before,
                     "tries": [t.card() for t in self.tries], "passed": True},
            "vocabulary": self.vocabulary,
            "regrown_mlp_units": self.regrown,
        }


# The allocation probe ranks five pruned candidates measured on the same items, which differ by tenths of a
# nat (SmolLM2, keep 0.6: 2.64 against 2.72 and more); the daemon's default calibration (256 items) has
# always ranked them on 128. Uncapped, 1,900 calibration items made a probe of 950 that took 4-5 minutes a
# candidate on 2 cores (py-spy samples of bench/reduction --calibration 1900), the cost of an MLP epoch.
ALLOCATION_PROBE_ITEMS = 128

IMPORTANCE_TEXT = {
    "activation": "activations on the lineage's replay + recent data: MLP neuron RMS x down_proj column norm, "
                  "KV group RMS head output, block 1 - cos(input, output)",
}
RECONSTRUCTION_TEXT = ("down_proj / o_proj refitted by least squares to the unpruned outputs, then block by block to "
                       "the parent's residual stream (least squares, then each MLP trained on the block's cached "
                       "inputs), on the calibration items (each kept only where it does not worsen held-out "
                       "perplexity)")


@dataclass
class Reduction:
    model: object | None  # the smaller LlamaForCausalLM; None when every try failed its gate
    tokenizer: object
    record: ReductionRecord


def reduce(teacher, tokenizer, data: ReductionData, policy: ReductionPolicy, sw: Switches,
           name: str = "") -> Reduction:
    """Reduce ``teacher`` (a merged, dense model) on ``data`` under ``policy``; see the module docstring."""
    if not data.calibration or not data.gate:
        raise ValueError("a reduction needs calibration items and at least one gate set")
    seq, bs, bf16 = sw.max_seq_len, sw.batch_size, sw.bf16

    def ppl(model, sets: Sets, tok=tokenizer) -> dict[str, float]:
        return {d: math.exp(evaluate_loss(model, tok, v, seq, bs, bf16)) for d, v in sets.items()}

    def worst(after: dict[str, float]) -> float:  # the gate's measure: worst ratio to the teacher
        return policy.passes(rec.ppl_before, after)[1]

    shape = ModelShape.of(teacher.config)
    rec = ReductionRecord(shape=shape, importance=sw.importance, calibration_items=len(data.calibration),
                          heal_items=len(data.heal), heal_steps=sw.heal_steps, budget=policy.budget,
                          n_params_before=count_parameters(teacher), ppl_before=ppl(teacher, data.gate),
                          watch_before=ppl(teacher, data.watch))
    importance = _importance(teacher, tokenizer, data.calibration, sw)
    plain_importance = replace(importance, mlp_gram=None, attn_gram=None)
    probe = data.calibration[: min(ALLOCATION_PROBE_ITEMS, max(8, len(data.calibration) // 2))]
    chosen = None
    for keep in policy.keeps():
        t0 = time.monotonic()
        plan, candidates = _allocation(teacher, tokenizer, importance, probe, keep, sw)
        log.info("%sreduction keep %.2f: allocations (probe loss) %s -> %s", name, keep,
                 {k: round(v, 3) for k, v in candidates.items()}, plan.label)
        watch: dict[str, dict[str, float]] = {}
        student = prune(teacher, plain_importance, plan.intermediate, plan.kv_heads, plan.layers)
        ppl_cut, watch["cut"] = ppl(student, data.gate), ppl(student, data.watch)
        ppl_pruned, ppl_refit, refit_kept = ppl_cut, None, None
        if importance.mlp_gram is not None and sw.refit != "off":
            refitted = prune(teacher, importance, plan.intermediate, plan.kv_heads, plan.layers)
            ppl_refit = ppl(refitted, data.gate)
            refit_kept = sw.refit == "on" or worst(ppl_refit) <= worst(ppl_cut)
            if refit_kept:
                student, ppl_pruned = refitted, ppl_refit
            del refitted
        watch["pruned"] = ppl(student, data.watch)
        seconds = {"prune": time.monotonic() - t0}

        t0 = time.monotonic()
        ppl_reconstructed, reconstruction_kept = None, None
        if sw.reconstruct != "off":
            cut = {k: v.clone() for k, v in student.state_dict().items()}
            reconstruct(student, teacher, kept_blocks(importance, plan.layers), data.calibration, tokenizer, seq, bs,
                        mlp_item_passes=sw.mlp_item_passes)
            ppl_reconstructed, watch["reconstructed"] = ppl(student, data.gate), ppl(student, data.watch)
            reconstruction_kept = sw.reconstruct == "on" or worst(ppl_reconstructed) <= worst(ppl_pruned)
            if not reconstruction_kept:
                student.load_state_dict(cut)
            del cut
        seconds["reconstruct"] = time.monotonic() - t0

        t0 = time.monotonic()

        def progress(i: int, n: int, loss: float, keep=keep, student=student) -> None:
            if i == n or i % max(1, n // 5) == 0:
                log.info("%shealing keep=%.2f step %d/%d kl=%.4f", name, keep, i, n, loss)
            if sw.on_heal_step is not None:
                sw.on_heal_step(student, i, n, loss)

        kl = heal(student, teacher, data.heal, tokenizer, seq, sw.heal_steps, lr=sw.heal_lr, batch_size=sw.heal_batch,
                  bf16=bf16, progress=progress)
        seconds["heal"] = time.monotonic() - t0
        ppl_healed, watch["healed"] = ppl(student, data.gate), ppl(student, data.watch)
        ok, ratio = policy.passes(rec.ppl_before, ppl_healed)
        rec.tries.append(Try(keep, round(plan.keep_achieved, 4), plan.label, {k: round(v, 4) for k, v in
                                                                               candidates.items()},
                             plan.intermediate, plan.kv_heads, plan.layers, ppl_cut, ppl_refit, refit_kept, ppl_pruned,
                             ppl_reconstructed, reconstruction_kept, ppl_healed, ratio, ok, kl[-1] if kl else None,
                             seconds, watch if data.watch else {}))
        log.info("%sreduction keep %.2f -> worst held-out ppl ratio %.3f (%s)", name, keep, ratio,
                 "pass" if ok else "fail")
        if ok:
            chosen = (plan, student, ppl_healed)
            break
        del student

    if chosen is None:
        return Reduction(None, tokenizer, rec)
    rec.plan, student, rec.ppl_after = chosen
    if sw.regrow > 0:  # changes no output (the fresh units write nothing yet): the gate's verdict stands
        rec.regrown = rec.regrow_units(sw.regrow)
        student = regrow(student, rec.regrown, seed=0)
    out_tok = tokenizer
    if data.vocabulary is not None:
        student, out_tok, rec.vocabulary = _trim_vocabulary(student, tokenizer, data, rec, policy, sw, name)
    rec.n_params_after = count_parameters(student)
    return Reduction(student, out_tok, rec)


def _importance(teacher, tokenizer, items: Sequence[Example], sw: Switches) -> Importance:
    if sw.importance == "activation":
        return activation_importance(teacher, items, tokenizer, sw.max_seq_len, sw.batch_size)
    if sw.importance == "magnitude":
        return magnitude_importance(teacher)
    if sw.importance == "random":
        return random_importance(teacher)
    raise ValueError(f"unknown importance {sw.importance!r}")


def _allocation(teacher, tokenizer, importance: Importance, probe: Sequence[Example], keep: float,
                sw: Switches) -> tuple[ReductionPlan, dict[str, float]]:
    """The allocation of ``keep`` with the lowest loss on ``probe`` right after pruning (or ``sw.plan``)."""
    if sw.plan is not None:
        return sw.plan, {}
    candidates = []
    for plan in plan_candidates(ModelShape.of(teacher.config), keep):
        student = prune(teacher, importance, plan.intermediate, plan.kv_heads, plan.layers)
        candidates.append((evaluate_loss(student, tokenizer, probe, sw.max_seq_len, sw.batch_size, sw.bf16), plan))
        del student
    best = min(candidates, key=lambda c: c[0])[1]
    return best, {p.label: loss for loss, p in candidates}


def _trim_vocabulary(model, tokenizer, data: ReductionData, rec: ReductionRecord, policy: ReductionPolicy,
                     sw: Switches, name: str):
    """``model`` and its tokenizer without the tokens ``data.vocabulary`` never uses, or unchanged (with
    the record of why) when the reduction, trim included, would leave the gate's budget.

    Text the kept tokens do not cover is split into shorter tokens, which the model spells less well,
    so the trim is judged per byte of text: the trimmed model's held-out loss per byte, over the
    untrimmed one's, scales the untrimmed model's loss per token, which gives the perplexity the
    trimmed model would have in the parent's tokens, judged against the parent like every other try.
    """
    keep = kept_token_ids(tokenizer, token_counts(tokenizer, data.vocabulary))
    small, small_tok = trim_vocabulary(model, tokenizer, keep)

    def per_byte(m, tok) -> dict[str, float]:
        return {d: evaluate_loss(m, tok, v, sw.max_seq_len, sw.batch_size, sw.bf16, per_byte=True)
                for d, v in data.gate.items()}

    before, after = per_byte(model, tokenizer), per_byte(small, small_tok)
    in_parent_tokens = {d: rec.ppl_after[d] ** (after[d] / before[d]) for d in before}
    kept, worst = policy.passes(rec.ppl_before, in_parent_tokens)
    record = {"tokens": [len(tokenizer), len(keep)], "items": len(data.vocabulary), "kept": kept,
              "loss_per_byte_before": before, "loss_per_byte_after": after,
              "ppl_in_parent_tokens": in_parent_tokens, "worst_ratio": worst}
    log.info("%svocabulary %d -> %d tokens, held-out loss per byte %s -> %s, worst ratio %.3f (%s)", name,
             len(tokenizer), len(keep), before, after, worst, "kept" if kept else "dropped")
    if not kept:
        return model, tokenizer, record
    record["ppl_after"] = rec.ppl_after = {
        d: math.exp(evaluate_loss(small, small_tok, v, sw.max_seq_len, sw.batch_size, sw.bf16))
        for d, v in data.gate.items()}
    return small, small_tok, record
