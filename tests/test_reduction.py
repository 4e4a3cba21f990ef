"""Merge, importance, structured pruning and healing on a tiny Llama."""
from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners.data import Example, collate
from learners.reduce import ReductionData, Switches, reduce
from learners.reduction import (MergeError, activation_importance, count_parameters, heal, kept_blocks,
                                magnitude_importance, merge_adapter, mlp_epochs, prune, random_importance,
                                reconstruct)
from learners.update import ContinualLearner, UpdateConfig, evaluate_loss, load_causal_lm
from policies.reduction import WIDTH_MULTIPLE, ModelShape, ReductionPolicy, plan_candidates, plan_reduction

DATA = [Example(id=str(i), prompt=f"Line {i}:", response=f" the value {i % 5} is stored.") for i in range(24)]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_merge_preserves_logits_and_refuses_a_bad_merge(tiny_model, tok, monkeypatch):
    L = ContinualLearner(tiny_model, tok, UpdateConfig(lora_rank=4, learning_rate=5e-3, max_seq_len=32))
    for i in range(0, 24, 4):
        L.step(DATA[i : i + 4])
    b = collate(tok, DATA[:3], 32)
    with torch.no_grad():
        want = L.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    merged = merge_adapter(L.model, DATA[:3], tok, 32)
    with torch.no_grad():
        got = merged(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not any("lora" in n for n, _ in merged.named_parameters())

    L2 = ContinualLearner(tiny_model, tok, UpdateConfig(lora_rank=4, learning_rate=5e-3, max_seq_len=32))
    L2.step(DATA[:4])
    real_merge = type(L2.model.base_model).merge_and_unload

    def corrupting_merge(self, *a, **k):
        m = real_merge(self, *a, **k)
        with torch.no_grad():
            m.model.layers[0].mlp.down_proj.weight.add_(1.0)
        return m

    monkeypatch.setattr(type(L2.model.base_model), "merge_and_unload", corrupting_merge)
    with pytest.raises(MergeError):
        merge_adapter(L2.model, DATA[:3], tok, 32)


def test_pruned_model_reloads_with_identical_logits_and_planned_size(tiny_model, tok, tmp_path):
    model = load_causal_lm(tiny_model)
    shape = ModelShape.of(model.config)
    assert shape.total() == count_parameters(model)
    plan = plan_reduction(shape, 0.6)
    imp = activation_importance(model, DATA, tok, 32)
    assert imp.neurons.shape == (model.config.num_hidden_layers, model.config.intermediate_size)
    small = prune(model, imp, plan.intermediate)
    assert count_parameters(small) == plan.n_params_after
    # Within rounding of the requested share of non-embedding parameters.
    per_neuron_share = 3 * shape.hidden * shape.layers * WIDTH_MULTIPLE / shape.non_embedding()
    assert abs(plan.keep_achieved - 0.6) <= per_neuron_share
    small.save_pretrained(tmp_path / "g", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32)
    assert reloaded.config.intermediate_size == plan.intermediate
    b = collate(tok, DATA[:4], 32)
    with torch.no_grad():
        a = small(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        c = reloaded(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
    assert torch.allclose(a, c, atol=1e-5)


def test_keeping_every_neuron_changes_nothing(tiny_model, tok):
    model = load_causal_lm(tiny_model)
    same = prune(model, activation_importance(model, DATA, tok, 32), model.config.intermediate_size)
    assert evaluate_loss(same, tok, DATA, 32) == pytest.approx(evaluate_loss(model, tok, DATA, 32), abs=1e-5)


def test_activation_scores_follow_what_the_data_uses(tiny_model, tok):
    model = load_causal_lm(tiny_model)
    with torch.no_grad():  # silence neuron 5 of layer 0: it never fires on any data
        model.model.layers[0].mlp.up_proj.weight[5].zero_()
        model.model.layers[0].mlp.down_proj.weight[:, 7].mul_(100.0)
    act = activation_importance(model, DATA, tok, 32).neurons
    assert act[0, 5] == 0 and act[0, 7] == act[0].max()
    for baseline in (magnitude_importance(model), random_importance(model)):
        assert baseline.neurons.shape == act.shape and baseline.kv_groups.shape == (2, 2)


def test_healing_by_distillation_closes_part_of_the_gap(tiny_model, tok):
    teacher = load_causal_lm(tiny_model)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    b = collate(tok, DATA, 32)
    for _ in range(30):  # give the random model some structure worth keeping
        loss = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher.eval()
    # Healing on its own: without the least-squares refit, which leaves little for it to close here.
    student = prune(teacher, replace(activation_importance(teacher, DATA, tok, 32), mlp_gram=None, attn_gram=None), 16)

    def kl():
        b = collate(tok, DATA, 32)
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=b.input_ids).logits, -1)
            s = torch.log_softmax(student(input_ids=b.input_ids).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    before = kl()
    seen = []
    losses = heal(student, teacher, DATA, tok, 32, steps=15, lr=1e-3, batch_size=8, progress=lambda i, n, l: seen.append(i))
    assert seen == list(range(1, 16)) and len(losses) == 15
    assert kl() < 0.7 * before


def _trained_teacher(tiny_model, tok):
    teacher = load_causal_lm(tiny_model)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    b = collate(tok, DATA, 32)
    for _ in range(30):
        loss = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def _kl(teacher, student, tok) -> float:
    b = collate(tok, DATA, 32)
    m = b.attention_mask.bool()
    with torch.no_grad():
        t = torch.log_softmax(teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[m], -1)
        s = torch.log_softmax(student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[m], -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_least_squares_refit_and_reconstruction_make_up_for_what_was_pruned(tiny_model, tok):
    teacher = _trained_teacher(tiny_model, tok)
    imp = activation_importance(teacher, DATA, tok, 32)
    cfg = teacher.config
    assert [g.shape for g in imp.mlp_gram] == [(cfg.intermediate_size,) * 2] * 2
    assert [g.shape for g in imp.attn_gram] == [(cfg.num_attention_heads * 16,) * 2] * 2
    # The neuron score is the RMS activation (the Gram diagonal) times the down_proj column norm.
    per_token = imp.mlp_gram[0].diagonal() / (imp.neurons[0] / teacher.model.layers[0].mlp.down_proj.weight.norm(dim=0)) ** 2
    assert torch.allclose(per_token, per_token.mean().expand_as(per_token), rtol=1e-3)
    plain = prune(teacher, replace(imp, mlp_gram=None, attn_gram=None), 16, kv_heads=1)
    refitted = prune(teacher, imp, 16, kv_heads=1)
    assert _kl(teacher, refitted, tok) < 0.8 * _kl(teacher, plain, tok)
    before = _kl(teacher, refitted, tok)
    reconstruct(refitted, teacher, kept_blocks(imp, 2), DATA, tok, 32, batch_size=5)
    assert _kl(teacher, refitted, tok) < before
    # Narrower: least squares alone helps, and training each pruned MLP on its block's inputs goes further.
    trained = prune(teacher, imp, 8, kv_heads=1)
    least_squares_only = deepcopy(trained)
    before = _kl(teacher, trained, tok)
    reconstruct(trained, teacher, kept_blocks(imp, 2), DATA, tok, 32, batch_size=5)
    reconstruct(least_squares_only, teacher, kept_blocks(imp, 2), DATA, tok, 32, batch_size=5, mlp_item_passes=0)
    assert _kl(teacher, trained, tok) < 0.6 * _kl(teacher, least_squares_only, tok) < 0.6 * before
    # A block dropped as well: the blocks after it are fitted to make up for it.
    shallow = prune(teacher, imp, 48, layers=1)
    before = _kl(teacher, shallow, tok)
    reconstruct(shallow, teacher, kept_blocks(imp, 1), DATA, tok, 32)
    assert _kl(teacher, shallow, tok) < before


def test_mlp_training_shares_one_budget_of_items_across_epochs():
    assert mlp_epochs(176) == mlp_epochs(256) == 8  # the measured small-data setting, capped
    assert mlp_epochs(600) == 3 and mlp_epochs(1900) == 1 and mlp_epochs(10_000) == 1  # never less than one
    assert mlp_epochs(1900, item_passes=0) == 0 and mlp_epochs(0) == 0


def test_reconstructing_an_unpruned_copy_changes_nothing(tiny_model, tok):
    teacher = _trained_teacher(tiny_model, tok)
    imp = activation_importance(teacher, DATA, tok, 32)
    copy = prune(teacher, imp, teacher.config.intermediate_size)
    reconstruct(copy, teacher, kept_blocks(imp, 2), DATA, tok, 32)
    assert torch.allclose(_logits(copy, tok), _logits(teacher, tok), atol=5e-3)  # up to the ridge's damping


def test_reduction_policy_backs_off_and_judges_perplexity():
    p = ReductionPolicy(every=100, keep=0.6, budget=1.1)
    assert p.keeps() == [0.6, 0.7, 0.8]
    assert p.due(100) and not p.due(99) and not ReductionPolicy(0, 0.6, 1.1).due(10**9)
    assert p.passes({"a": 10.0}, {"a": 10.9}) == (True, pytest.approx(1.09))
    assert p.passes({"a": 10.0, "b": 5.0}, {"a": 10.0, "b": 6.0})[0] is False


def _logits(model, tok):
    b = collate(tok, DATA[:4], 32)
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def test_dead_heads_and_blocks_score_zero_and_pruning_them_changes_nothing(tiny_model, tok, tmp_path):
    model = load_causal_lm(tiny_model)  # 2 blocks, 4 query heads in 2 KV groups, head_dim 16
    with torch.no_grad():
        # KV group 0 of block 0 (query heads 0, 1) writes nothing to the residual stream,
        model.model.layers[0].self_attn.o_proj.weight[:, :32].zero_()
        # and block 1 writes nothing at all: its output equals its input.
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    imp = activation_importance(model, DATA, tok, 32)
    assert imp.kv_groups[0, 0] == 0 and imp.kv_groups[0, 1] > 0
    assert imp.layers[1] == pytest.approx(0, abs=1e-6) and imp.layers[0] > 1e-3
    small = prune(model, replace(imp, mlp_gram=None, attn_gram=None), model.config.intermediate_size, kv_heads=1,
                  layers=1)
    assert (small.config.num_hidden_layers, small.config.num_key_value_heads, small.config.num_attention_heads) == (1, 1, 2)
    assert torch.allclose(_logits(small, tok), _logits(model, tok), atol=1e-4)
    # The least-squares refit has nothing to make up for: the same, up to its damping.
    refitted = prune(model, imp, model.config.intermediate_size, kv_heads=1, layers=1)
    assert torch.allclose(_logits(refitted, tok), _logits(model, tok), atol=5e-3)
    shape = ModelShape.of(model.config).reshaped(model.config.intermediate_size, 1, 1)
    assert count_parameters(small) == shape.total()
    small.save_pretrained(tmp_path / "g", safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32)
    assert torch.allclose(_logits(reloaded, tok), _logits(model, tok), atol=1e-4)


def test_candidate_allocations_spend_the_same_budget_differently(tiny_model):
    from transformers import AutoConfig

    smol = ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                      tied=True)
    plans = plan_candidates(smol, 0.6)
    labels = {(p.intermediate < 1536, p.kv_heads < 3, p.layers < 30) for p in plans}
    assert {(True, False, False), (True, True, False), (True, False, True)} <= labels
    step = 3 * 576 * 30 * WIDTH_MULTIPLE / smol.non_embedding()  # one rounding step of the MLP width
    for p in plans:
        assert abs(p.keep_achieved - 0.6) <= step and p.heads == 3 * p.kv_heads and p.intermediate % 32 == 0
    tiny = ModelShape.of(AutoConfig.from_pretrained(tiny_model))
    for p in plan_candidates(tiny, 0.7):
        assert p.layers >= 1 and p.kv_heads >= 1 and 8 <= p.intermediate <= tiny.intermediate


# -- the reducer (learners/reduce.py): the decisions it makes --------------------------------------------

@pytest.fixture(scope="module")
def teacher(tiny_model, tok):
    return _trained_teacher(tiny_model, tok)  # the reducer never modifies its teacher (checked below)


def _reduce(teacher, tok, budget=math.inf, keep=0.6, max_tries=1, **switches):
    data = ReductionData(calibration=DATA[:16], heal=DATA, gate={"d": DATA[16:]}, **switches.pop("data", {}))
    policy = ReductionPolicy(every=0, keep=keep, budget=budget, max_tries=max_tries)
    return reduce(teacher, tok, data, policy, Switches(max_seq_len=32, batch_size=8, heal_steps=2, **switches))


def test_the_reducer_keeps_refit_and_reconstruction_only_where_the_gate_sets_agree(teacher, tok):
    before = _logits(teacher, tok)
    out = _reduce(teacher, tok)
    (t,) = out.record.tries
    policy = ReductionPolicy(0, 0.6, math.inf)
    worst = lambda ppl: policy.passes(out.record.ppl_before, ppl)[1]  # noqa: E731
    assert t.refit_kept == (worst(t.ppl_refitted) <= worst(t.ppl_cut))
    assert t.ppl_pruned == (t.ppl_refitted if t.refit_kept else t.ppl_cut)
    assert t.reconstruction_kept == (worst(t.ppl_reconstructed) <= worst(t.ppl_pruned))
    # The result is the passing try's plan, healed; the teacher is left as it was.
    assert out.record.passed and out.record.plan.label == t.plan and t.plan in t.candidates
    assert out.model.config.intermediate_size == t.mlp_intermediate and out.record.ppl_after == t.ppl_healed
    assert out.record.n_params_after == count_parameters(out.model) < out.record.n_params_before
    assert torch.equal(_logits(teacher, tok), before)
    # Forced on / off: the switches override the decision.
    forced = _reduce(teacher, tok, refit="off", reconstruct="on").record.tries[0]
    assert forced.refit_kept is None and forced.ppl_refitted is None and forced.ppl_pruned == forced.ppl_cut
    assert forced.reconstruction_kept is True
    off = _reduce(teacher, tok, reconstruct="off").record.tries[0]
    assert off.reconstruction_kept is None and off.ppl_reconstructed is None


def test_the_reducer_backs_off_to_larger_keeps_and_gives_up_after_the_last(teacher, tok):
    # Only a perfect copy would pass; the least-squares steps are off, they do not change the back-off.
    out = _reduce(teacher, tok, budget=1.0 + 1e-9, keep=0.3, max_tries=3, refit="off", reconstruct="off")
    assert out.model is None and not out.record.passed
    assert [t.keep_target for t in out.record.tries] == [0.3, 0.4, 0.5]
    assert all(not t.passed and t.worst_ratio > 1.0 for t in out.record.tries)
    # Larger keeps never shrink the model (on the tiny model's 128-wide MLP they may round to the same
    # width: widths are multiples of policies.reduction.WIDTH_MULTIPLE).
    achieved = [t.keep_achieved for t in out.record.tries]
    assert achieved == sorted(achieved)


def test_data_free_scores_a_fixed_plan_and_the_heal_hook(teacher, tok):
    plan = plan_reduction(ModelShape.of(teacher.config), 0.6)
    seen = []
    out = _reduce(teacher, tok, importance="magnitude", reconstruct="off", plan=plan,
                  on_heal_step=lambda student, i, n, kl: seen.append((i, n, student.config.intermediate_size)),
                  data={"watch": {"other": DATA[:4]}})
    (t,) = out.record.tries
    assert t.candidates == {} and t.plan == plan.label and t.refit_kept is None  # no Gram matrices to refit with
    assert seen == [(1, 2, plan.intermediate), (2, 2, plan.intermediate)]
    assert set(t.watch) == {"cut", "pruned", "healed"} and set(t.watch["healed"]) == {"other"}
    assert set(out.record.watch_before) == {"other"} and "watch" not in t.card()


def test_the_reducer_trims_the_vocabulary_and_judges_the_trim_per_byte(teacher, tok):
    kept = _reduce(teacher, tok, data={"vocabulary": DATA})
    vocab = kept.record.vocabulary
    assert vocab["kept"] and len(kept.tokenizer) == vocab["tokens"][1] < vocab["tokens"][0] == len(tok)
    assert kept.model.config.vocab_size == len(kept.tokenizer) and kept.record.ppl_after == vocab["ppl_after"]
    # Judged per byte of text against the parent, as every try is.
    assert set(vocab["ppl_in_parent_tokens"]) == {"d"} and vocab["items"] == len(DATA)


def test_regrown_units_are_fresh_write_nothing_yet_and_can_be_learned(teacher, tok):
    """The plasticity remedy: fresh MLP units after pruning. The outputs are those of the model they were added
    to; their input rows are new random directions at the block's scale; a gradient reaches what reads them."""
    from learners.reduction import regrow

    small = _reduce(teacher, tok).model
    width = small.config.intermediate_size
    grown = regrow(small, 16, seed=3)
    assert grown.config.intermediate_size == width + 16 and small.config.intermediate_size == width
    assert torch.allclose(_logits(grown, tok), _logits(small, tok), atol=1e-5)
    for old, new in zip(small.model.layers, grown.model.layers):
        assert torch.equal(new.mlp.down_proj.weight[:, width:], torch.zeros_like(new.mlp.down_proj.weight[:, width:]))
        assert torch.equal(new.mlp.gate_proj.weight[:width], old.mlp.gate_proj.weight)
        fresh = new.mlp.up_proj.weight[width:]
        cos = F.normalize(fresh, dim=1) @ F.normalize(old.mlp.up_proj.weight, dim=1).T
        assert cos.abs().max() < 0.9 and 0.5 < fresh.std() / old.mlp.up_proj.weight.std() < 2.0
    # A step of learning can read them: the loss's gradient on the new columns of down_proj is not zero.
    b = collate(tok, DATA[:4], 32)
    grown(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss.backward()
    assert grown.model.layers[0].mlp.down_proj.weight.grad[:, width:].abs().sum() > 0
    # Through the reducer: a share of the pruned width, recorded, and the gate's figures unchanged.
    out = _reduce(teacher, tok, regrow=0.5)
    pruned = ModelShape.of(teacher.config).intermediate - out.record.plan.intermediate
    assert out.record.regrown == round(0.5 * pruned) > 0
    assert out.model.config.intermediate_size == out.record.plan.intermediate + out.record.regrown
    assert out.record.card("command", {}, 0.6)["regrown_mlp_units"] == out.record.regrown
