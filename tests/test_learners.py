"""The update step and its constraints, on a tiny Llama (plain torch + peft, no Ray, no Redis)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoTokenizer

from learners.data import IGNORE, Example, collate, encode
from learners.update import ALL_CONSTRAINTS, ContinualLearner, UpdateConfig, evaluate_loss

DATA = [Example(id=str(i), prompt=f"Q{i}:", response=f" answer {i % 3} done.") for i in range(16)]
OTHER = [Example(id=f"o{i}", prompt="", response=f"zebra {i} quartz.", domain="other") for i in range(8)]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make(tiny_model, tok, **kw) -> ContinualLearner:
    kw = {"constraints": ALL_CONSTRAINTS, "replay_weight": 1.0, **kw}  # every term on, every row alike
    cfg = UpdateConfig(lora_rank=4, learning_rate=5e-3, batch_size=4, max_seq_len=32, **kw)
    return ContinualLearner(tiny_model, tok, cfg)


def test_only_response_tokens_carry_loss_and_truncation_keeps_the_response(tok):
    ids, labels = encode(tok, Example("1", "a prompt here", " the response"), 64)
    n_resp = len(tok(" the response", add_special_tokens=False)["input_ids"]) + 1
    assert sum(l != IGNORE for l in labels) == n_resp and len(ids) == len(labels)
    ids, labels = encode(tok, Example("1", "word " * 100, " short"), 16)
    assert len(ids) == 16 and sum(l != IGNORE for l in labels) == n_resp - 1
    b = collate(tok, [Example("1", "", "a"), Example("2", "", "a much longer response")], 32)
    assert b.attention_mask[0].sum() < b.attention_mask[1].sum()


def test_steps_lower_the_loss_on_what_is_learned(tiny_model, tok):
    L = make(tiny_model, tok, constraints=frozenset())
    before = L.evaluate(DATA)
    for _ in range(6):
        for i in range(0, 16, 4):
            L.step(DATA[i : i + 4])
    assert L.evaluate(DATA) < before - 0.5


def test_rollback_restores_the_accepted_adapter_exactly(tiny_model, tok):
    L = make(tiny_model, tok)
    L.step(DATA[:4])
    L.accept()
    ref = {n: p.detach().clone() for n, p in L.params.items()}
    L.step(DATA[4:8])
    assert any(not torch.equal(ref[n], p) for n, p in L.params.items())
    L.rollback()
    assert all(torch.equal(ref[n], p) for n, p in L.params.items())


def test_anchor_penalty_pulls_toward_the_accepted_adapter(tiny_model, tok):
    def drift(constraints, weight):
        torch.manual_seed(0)
        L = make(tiny_model, tok, constraints=constraints, anchor_weight=weight)
        L.step(DATA[:4])
        L.accept()
        ref = {n: p.detach().clone() for n, p in L.params.items()}
        for _ in range(5):
            L.step(OTHER[:4])
        return sum(float(((p.detach() - ref[n]) ** 2).sum()) for n, p in L.params.items())

    assert drift(frozenset({"anchor"}), 500.0) < 0.8 * drift(frozenset(), 0.0)


def test_distillation_keeps_replayed_outputs_near_the_generation(tiny_model, tok):
    # The replayed rows carry no task loss here: what learning the new rows does to them is drift, which the
    # generation (knowing them better than the drifted student) pulls back.
    def kl_from_generation(constraints):
        torch.manual_seed(0)
        L = make(tiny_model, tok, constraints=constraints, distill_weight=5.0, replay_weight=0.0)
        for _ in range(6):
            L.step(DATA[:2], OTHER[:2])
        b = collate(tok, OTHER[:2], 32)
        with torch.no_grad():
            cur = torch.log_softmax(L.model(input_ids=b.input_ids).logits, -1)
            with L.model.disable_adapter():
                ref = torch.log_softmax(L.model(input_ids=b.input_ids).logits, -1)
        return float((ref.exp() * (ref - cur)).sum(-1).mean())

    assert kl_from_generation(frozenset({"distill"})) < 0.8 * kl_from_generation(frozenset())


def test_distillation_does_not_pull_a_learned_row_back_to_the_generation(tiny_model, tok):
    """Where the student gives a replayed row's tokens more probability than the generation does (it has
    learned the row), the generation does not teach there: distillation leaves that learning alone."""
    torch.manual_seed(0)
    L = make(tiny_model, tok, constraints=frozenset({"distill"}), distill_weight=5.0)
    for _ in range(8):  # learn OTHER as new rows: beyond the generation on every position of it
        L.step(OTHER[:2])
    learned = L.evaluate(OTHER[:2])
    torch.manual_seed(1)
    rep = L.step([], OTHER[:2])  # replayed alone, with distillation toward the generation on
    assert rep.distill == 0.0 and L.evaluate(OTHER[:2]) < learned


def test_replay_weight_sets_a_replayed_rows_share_of_the_task_loss(tiny_model, tok):
    def task_loss(weight, replay):
        torch.manual_seed(0)
        return make(tiny_model, tok, constraints=frozenset(), replay_weight=weight).step(DATA[:2], replay).task_loss

    new_only = task_loss(1.0, ())
    L = make(tiny_model, tok, constraints=frozenset())  # each row's loss, as the step measures it before it moves
    per_row = [L.evaluate([ex]) for ex in DATA[:2] + OTHER[:2]]
    assert task_loss(0.0, OTHER[:2]) == pytest.approx(new_only, rel=1e-5)  # replayed rows carry nothing
    assert task_loss(1.0, OTHER[:2]) == pytest.approx(sum(per_row) / 4, rel=1e-4)  # every row alike
    half = (per_row[0] + per_row[1] + 0.5 * (per_row[2] + per_row[3])) / 3
    assert task_loss(0.5, OTHER[:2]) == pytest.approx(half, rel=1e-4)


def test_step_reports_the_terms_that_are_on(tiny_model, tok):
    L = make(tiny_model, tok)
    L.step(DATA[:2], OTHER[:2])
    L.accept()
    assert L.step(DATA[2:4], OTHER[2:4]).anchor == 0  # measured before the step: still at the anchor
    r = L.step(DATA[2:4], OTHER[2:4])
    assert r.anchor > 0 and r.distill > 0 and r.n_replay == 2
    naive = make(tiny_model, tok, constraints=frozenset())
    naive.step(DATA[:2], OTHER[:2])
    r = naive.step(DATA[2:4], OTHER[2:4])
    assert r.anchor == 0 and r.distill == 0


def test_gradient_clipping_bounds_the_step(tiny_model, tok):
    def delta(constraints):
        torch.manual_seed(0)
        L = make(tiny_model, tok, constraints=constraints, max_grad_norm=1e-4)
        L.reset_optimizer(torch.optim.SGD, lr=1.0)
        ref = {n: p.detach().clone() for n, p in L.params.items()}
        L.step(DATA[:4])
        return sum(float(((p - ref[n]) ** 2).sum()) for n, p in L.params.items()) ** 0.5

    assert delta(frozenset({"clip"})) <= 1.01e-4 < delta(frozenset())


def test_one_step_cannot_move_the_adapter_further_than_the_cap(tiny_model, tok):
    L = make(tiny_model, tok, constraints=frozenset({"clip"}), max_grad_norm=1e6, max_update_scale=0.01)
    L.reset_optimizer(torch.optim.SGD, lr=10.0)
    cap = 0.01 * L.config.learning_rate * L.n_trainable ** 0.5
    assert L.update_cap() == pytest.approx(cap)
    ref = {n: p.detach().clone() for n, p in L.params.items()}
    r = L.step(DATA[:4])
    moved = sum(float(((p.detach() - ref[n]) ** 2).sum()) for n, p in L.params.items()) ** 0.5
    assert r.update_norm > cap and moved == pytest.approx(cap, rel=1e-3)


def test_negative_reward_pushes_the_response_down(tiny_model, tok):
    target = [Example("n", "Say:", " forbidden phrase here.", reward=-1.0)]
    L = make(tiny_model, tok, constraints=frozenset())
    before = L.evaluate([dataclasses.replace(target[0], reward=1.0)])
    for _ in range(5):
        L.step(target)
    assert L.evaluate(target) > before
    zero = make(tiny_model, tok, constraints=frozenset())
    r = zero.step([dataclasses.replace(target[0], reward=0.0)])
    assert r.task_loss == 0.0


def test_saved_adapter_reloads_to_the_same_outputs(tiny_model, tok, tmp_path):
    L = make(tiny_model, tok)
    L.step(DATA[:4])
    L.save(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    M = ContinualLearner(tiny_model, tok, L.config, adapter_dir=tmp_path / "a")
    assert abs(M.evaluate(DATA) - L.evaluate(DATA)) < 1e-5
    assert evaluate_loss(M.model, tok, DATA, 32) == pytest.approx(M.evaluate(DATA), abs=1e-6)


def reference_gradients(L: ContinualLearner, loss: torch.Tensor, state: dict) -> dict:
    """The adapter's gradients of ``loss`` (written on whole logits), with the adapter set back to ``state``
    so that the step under test starts where the reference did."""
    L.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    want = {n: p.grad.clone() for n, p in L.params.items()}
    with torch.no_grad():
        for name, p in L.params.items():
            p.copy_(state[name])
    return want


@pytest.mark.parametrize("chunk", [7 * 512, 1 << 24])  # a few positions at a time (the tiny vocabulary is 512), all
def test_the_chunked_loss_has_the_gradient_of_the_whole_logits_loss(tiny_model, tok, monkeypatch, chunk):
    """Without whole logits the step still takes the gradient of the loss written out on whole logits:
    reward-weighted task loss (a negative reward too), replay weight and distillation on replayed rows."""
    import learners.update as update

    monkeypatch.setattr(update, "LOGIT_CHUNK", chunk)
    new = [DATA[0], dataclasses.replace(DATA[1], reward=-0.5), dataclasses.replace(DATA[2], reward=2.0)]
    replay = OTHER[:2]
    kw = {"constraints": frozenset({"distill"}), "replay_weight": 0.5, "distill_weight": 0.7}
    torch.manual_seed(0)
    L = make(tiny_model, tok, **kw)
    with torch.no_grad():  # a non-zero adapter, so that distillation has something to pull on
        for p in L.params.values():
            p.add_(0.05 * torch.randn_like(p))
    ref_state = {n: p.detach().clone() for n, p in L.params.items()}

    # The reference: the loss on whole logits, as the module's docstring writes it.
    b = collate(tok, new + replay, 32)
    logits = L.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    target, mask = b.labels[:, 1:], b.labels[:, 1:] != IGNORE
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    n = mask.sum(-1).clamp(min=1)
    nll = -(picked * mask).sum(-1) / n
    unlikely = -(torch.log1p(-picked.exp().clamp(max=1 - 1e-6)) * mask).sum(-1) / n
    r = b.rewards
    per_row = torch.where(r > 0, r * nll, torch.where(r < 0, -r * unlikely, torch.zeros_like(nll)))
    w = torch.tensor([1.0] * len(new) + [0.5] * len(replay))
    task = (per_row * w).sum() / w.sum()
    with torch.no_grad(), L.model.disable_adapter():
        ref_logp = torch.log_softmax(L.model(input_ids=b.input_ids[3:], attention_mask=b.attention_mask[3:])
                                     .logits[:, :-1].float(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp[3:])).sum(-1)
    # The generation teaches only where it gives the next token at least the student's probability.
    t = target[3:].clamp(min=0).unsqueeze(-1)
    knows = ref_logp.gather(-1, t).squeeze(-1) >= logp[3:].detach().gather(-1, t).squeeze(-1)
    assert 0 < int((knows & mask[3:]).sum()) < int(mask[3:].sum())  # both cases occur here
    distill = (kl * mask[3:] * knows).sum() / mask[3:].sum()
    want = reference_gradients(L, task + 0.7 * distill, ref_state)
    report = L.step(new, replay)  # no clipping: the gradients stay on the parameters as computed
    assert report.task_loss == pytest.approx(float(task), rel=1e-5)
    assert report.distill == pytest.approx(float(distill), rel=1e-4)
    for name, p in L.params.items():
        assert torch.allclose(p.grad, want[name], rtol=1e-3, atol=1e-6), name


def test_activation_checkpointing_changes_the_memory_not_the_step(tiny_model, tok):
    def after_steps(checkpointing):
        torch.manual_seed(0)
        L = make(tiny_model, tok, activation_checkpointing=checkpointing)
        reports = [L.step(DATA[:2], OTHER[:2]) for _ in range(2)]
        return [r.loss for r in reports], {n: p.detach().clone() for n, p in L.params.items()}

    losses, params = after_steps(False)
    losses_ckpt, params_ckpt = after_steps(True)
    assert losses_ckpt == pytest.approx(losses, rel=1e-5)
    assert all(torch.allclose(params[n], params_ckpt[n], atol=1e-6) for n in params)


def test_a_replayed_row_with_a_stored_prediction_is_pulled_toward_it(tiny_model, tok):
    """Distillation's gradient with one replayed row taught by its stored prediction (KL over its top-k
    tokens and the rest of the mass) and one by the generation, against the loss on whole logits."""
    from learners.replay import Prediction
    from learners.update import top_k_kl

    new, replay = DATA[:2], OTHER[:2]
    torch.manual_seed(0)
    L = make(tiny_model, tok, constraints=frozenset({"distill"}), replay_weight=0.5, distill_weight=0.7)
    with torch.no_grad():
        for p in L.params.values():
            p.add_(0.05 * torch.randn_like(p))
    ref_state = {n: p.detach().clone() for n, p in L.params.items()}
    b = collate(tok, new + replay, 32)
    mask = b.labels[:, 1:] != IGNORE
    n0 = int(mask[2].sum())
    gen = torch.Generator().manual_seed(1)
    tokens = torch.stack([torch.randperm(512, generator=gen)[:8] for _ in range(n0)]).int()
    logp = torch.log_softmax(torch.randn(n0, 9, generator=gen), -1)[:, :8]  # the 9th: the rest of the mass
    stored = Prediction(tokens, logp.half(), nll=1.0)

    logits = L.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    student = torch.log_softmax(logits, -1)
    picked = student.gather(-1, b.labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    nll = -(picked * mask).sum(-1) / mask.sum(-1)
    task = (nll[:2].sum() + 0.5 * nll[2:].sum()) / 3
    with torch.no_grad(), L.model.disable_adapter():
        ref = torch.log_softmax(L.model(input_ids=b.input_ids[3:], attention_mask=b.attention_mask[3:])
                                .logits[:, :-1].float(), -1)[0][mask[3]]
    t = b.labels[3, 1:][mask[3]].unsqueeze(-1)  # the generation teaches where it knows the next token better
    knows = ref.gather(-1, t).squeeze(-1) >= student[3][mask[3]].detach().gather(-1, t).squeeze(-1)
    kl_generation = ((ref.exp() * (ref - student[3][mask[3]])).sum(-1) * knows).sum()
    kl_stored = top_k_kl(logp.half().float(), student[2][mask[2]].gather(-1, tokens.long()))
    distill = (kl_generation + kl_stored) / (n0 + int(mask[3].sum()))
    want = reference_gradients(L, task + 0.7 * distill, ref_state)
    report = L.step(new, replay, [stored, None])
    assert report.distill == pytest.approx(float(distill), rel=1e-4)
    for name, p in L.params.items():
        assert torch.allclose(p.grad, want[name], rtol=1e-3, atol=1e-6), name


def test_an_arriving_sources_replayed_rows_are_learned_not_held_and_their_predictions_taken(tiny_model, tok):
    L = make(tiny_model, tok, constraints=frozenset({"distill"}), distill_weight=5.0)
    before = {ex.id: L.evaluate([ex]) for ex in DATA[2:4]}
    r = L.step(DATA[:2], DATA[2:4])  # the replayed rows' source is among the new rows': no teacher
    assert r.distill == 0 and set(r.predictions) == {ex.id for ex in DATA[2:4]}
    for ex in DATA[2:4]:
        p = r.predictions[ex.id]
        n = int((collate(tok, [ex], 32).labels[:, 1:] != IGNORE).sum())
        assert p.tokens.shape == (n, 8) and p.logp.dtype == torch.float16
        assert p.nll == pytest.approx(before[ex.id], rel=1e-4)  # taken before the step moved the adapter
        assert bool((p.logp[:, :-1] >= p.logp[:, 1:]).all())  # the likeliest first
    assert L.step(DATA[:2], OTHER[:2]).distill > 0  # another source's rows: toward the generation
