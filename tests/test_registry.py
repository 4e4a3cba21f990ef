"""Atomic registry writes, the ledger, and recovery from crashes between writes."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from daemon.config import load_settings
from daemon.foundation import ensure_foundation, safetensors_params
from daemon.lineage import LineageWorker
from daemon.registry import Ledger, Registry, RegistryError, atomic_write_json
from daemon.schema import Interaction


def items(n: int, start: int = 0) -> list[Interaction]:
    return [Interaction(entry_id=f"{i + 1}-0", id=f"i{i}", prompt=f"Item {i}:", response=f" colour {i % 3}.",
                        meta={"domain": "d"}) for i in range(start, start + n)]


def poison(n: int = 80, start: int = 100) -> list[Interaction]:
    """A burst of junk from a new source, harmful enough for the gate to roll it back."""
    return [Interaction(entry_id=f"{start + i}-0", id=f"p{i}", prompt="", response="@@@@ ~~~~ @@@@ ~~~~ " * 3,
                        meta={"domain": "junk"}) for i in range(n)]


def settings(tmp_path, tiny_model, **kw):
    base = dict(home=tmp_path / "home", base_model=tiny_model, batch_size=4, max_seq_len=32, learning_rate=3e-3,
                heal_steps=2, reduce_every=0, heldout_fraction=0.25)
    return load_settings(**{**base, **kw})


def test_foundation_from_a_model_dir(tmp_path, tiny_model):
    s = settings(tmp_path, tiny_model)
    d = Registry(s.registry_root).lineage("main")
    assert ensure_foundation(d, s.base_model) == "gen-0000"
    card = d.card("gen-0000")
    assert card["parent"] is None and card["generation"] == 0 and card["lineage"] == "main"
    m = AutoModelForCausalLM.from_pretrained(d.path / "gen-0000")
    assert card["n_params"] == m.num_parameters() == safetensors_params(d.path / "gen-0000")
    assert ensure_foundation(d, s.base_model) == "gen-0000"  # idempotent


def test_pickled_weights_are_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(RegistryError, match="safetensors"):
        ensure_foundation(Registry(tmp_path / "r").lineage("main"), bad)


@pytest.mark.parametrize("name", ["../x", "a/b", "", "UPPER", ".hidden", "x" * 65])
def test_lineage_names_cannot_escape_the_registry(tmp_path, name):
    with pytest.raises(RegistryError):
        Registry(tmp_path).lineage(name)


def test_ledger_forgets_steps_that_never_became_durable(tmp_path):
    led = Ledger(tmp_path / "l.sqlite")
    led.record([("a", "learned"), ("b", "learned")], 1)
    led.record([("c", "learned")], 2)
    assert led.seen(["a", "c", "z"]) == {"a", "c"}
    assert led.forget_after(1) == 1
    assert led.seen(["a", "b", "c"]) == {"a", "b"}


def test_atomic_json_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    atomic_write_json(tmp_path / "x.json", {"a": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["x.json"]


def test_worker_resumes_from_live_and_ignores_an_unpublished_step(tmp_path, tiny_model):
    s = settings(tmp_path, tiny_model)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    rep = w.learn(items(12))
    assert rep.learned + rep.heldout_added == 12 and sorted(rep.ack) == sorted(i.entry_id for i in items(12))
    w.learn(items(12, start=12))  # replays the first window's rows: their predictions are stored
    predicted = {e.id: w.replay.prediction(e) for e in w.replay.all() if w.replay.prediction(e) is not None}
    assert predicted
    step = w.step
    # A crash after the ledger recorded the next step but before live/ switched to it:
    w.ledger.record([("ghost", "learned")], step + 1)
    w.dir.new_checkpoint_dir(step + 1)  # a half-written checkpoint
    w.close()
    w2 = LineageWorker(s, "main")
    assert w2.step == step
    assert w2.ledger.seen(["ghost"]) == set()
    assert w2.ledger.seen([i.id for i in items(12)]) == {i.id for i in items(12)}
    assert len(list((w2.dir.path / ".live").iterdir())) == 1
    again = w2.learn(items(12))
    assert again.duplicates == 12 and again.learned == 0 and again.steps == 0
    assert [e.id for e in w2.replay.all()] == [e.id for e in w.replay.all()] and len(w2.replay) > 0
    assert w2.heldout == w.heldout
    assert all(torch.equal(w2.replay.prediction(e).tokens, predicted[e.id].tokens) for e in w2.replay.all()
               if e.id in predicted) and sum(w2.replay.prediction(e) is not None for e in w2.replay.all()) == len(predicted)


def test_gate_does_not_judge_sources_with_too_few_heldout_items(tmp_path, tiny_model):
    s = settings(tmp_path, tiny_model, learning_rate=0.05, heldout_fraction=0.5, gate_step_budget=0.01,
                 constraints="none", gate_min_items=1000, curation="none")  # the junk must reach the gate
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(120))
    rep = w.learn(poison(start=1000))
    assert rep.rollback is None and rep.learned > 0 and set(rep.heldout) == {"d", "junk"}


def test_naive_settings_really_switch_everything_off(tmp_path, tiny_model):
    s = settings(tmp_path, tiny_model, learning_rate=0.05, replay_ratio=0, constraints="none", gate=False,
                 curation="none")  # plain sequential LoRA: the identical junk below is learned too
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    assert w.learner.config.replay_count() == 0 and w.learner.config.constraints == frozenset()
    first = w.learn(items(40))
    poison = [Interaction(entry_id=f"{100 + i}-0", id=f"p{i}", prompt="", response="@@@@ ~~~~ " * 6)
              for i in range(30)]
    rep = w.learn(poison)
    # The held-out split stays with the gate off (a reduction is judged on it), but nothing is rolled back.
    held = first.heldout_added + rep.heldout_added
    assert first.heldout_added > 0 and sum(len(v) for v in w.heldout.values()) == held
    assert rep.rollback is None and rep.learned == 30 - rep.heldout_added and len(w.replay) == 0
    assert w.counters["interactions_learned"] == 70 - held


def test_failed_reduction_gate_leaves_current_untouched(tmp_path, tiny_model, monkeypatch):
    # The tiny model is still close to random: pruning and the least-squares reconstruction (which shrinks
    # its logits) can even lower its perplexity, so the gate is made to refuse every try here.
    from policies.reduction import ReductionPolicy

    monkeypatch.setattr(ReductionPolicy, "passes", lambda self, before, after: (False, 2.0))
    s = settings(tmp_path, tiny_model, reduce_budget=1.0, reduce_keep=0.2, heal_steps=0)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(24))
    rep = w.reduce()
    assert rep.outcome == "rejected" and "gate failed at every keep" in rep.detail
    assert (w.dir.path / "CURRENT").read_text().strip() == "gen-0000"
    assert w.dir.generations() == ["gen-0000"]
    assert not [p for p in w.dir.path.iterdir() if p.name.startswith(".staging")]
    # It keeps learning on the same generation and adapter afterwards.
    assert w.learn(items(8, start=24)).learned > 0


def test_crash_between_generation_write_and_current_switch(tmp_path, tiny_model):
    s = settings(tmp_path, tiny_model, reduce_budget=5.0)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(24))
    d = w.dir
    d_set_current = d.set_current
    d.set_current = lambda gen: (_ for _ in ()).throw(KeyboardInterrupt())  # the "crash"
    with pytest.raises(KeyboardInterrupt):
        w.reduce()
    d.set_current = d_set_current
    w.close()
    # gen-0001 exists but CURRENT still names gen-0000: the registry loads and the learner resumes.
    assert d.generations() == ["gen-0000", "gen-0001"] and d.current() == "gen-0000"
    AutoModelForCausalLM.from_pretrained(d.path / "gen-0001")
    w2 = LineageWorker(s, "main")
    resumed = w2.learn(items(8, start=24))
    assert w2.generation == "gen-0000" and len(resumed.ack) == 8 and resumed.steps > 0
    # The next reduction takes the next free name and becomes current.
    rep = w2.reduce()
    assert rep.outcome == "promoted" and rep.generation == "gen-0002" and d.current() == "gen-0002"
    assert d.card("gen-0002")["parent"] == "main/gen-0000"


def test_reduction_trims_the_vocabulary_and_learning_goes_on(tmp_path, tiny_model):
    s = settings(tmp_path, tiny_model, reduce_vocab=True, reduce_budget=10.0, heal_steps=1)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(40))
    w.learn(items(12, start=60))  # replays the first window's rows: their predictions are stored
    assert any(w.replay.prediction(e) is not None for e in w.replay.all())
    rep = w.reduce()
    assert rep.outcome == "promoted"
    # The predictions were the parent's (in its vocabulary): no teacher for the new generation.
    assert all(w.replay.prediction(e) is None for e in w.replay.all()) and w.replay.generation == rep.generation
    vocab = rep.card["reduction"]["vocabulary"]
    assert vocab["kept"] and vocab["tokens"][0] == 49152 and 256 < vocab["tokens"][1] < 1000
    assert vocab["worst_ratio"] <= s.reduce_budget and set(vocab["ppl_in_parent_tokens"]) == {"d"}
    gen = Registry(s.registry_root).lineage("main").path / rep.generation
    assert AutoModelForCausalLM.from_pretrained(gen).config.vocab_size == vocab["tokens"][1] == len(w.tokenizer)
    assert rep.card["n_params"] == safetensors_params(gen) < rep.n_params_before - 48000 * 64
    # The replay keeps raw text: the next step re-tokenizes it for the new vocabulary and learning goes on.
    after = w.learn(items(12, start=40))
    assert after.learned > 0 and w.generation == rep.generation
    w.close()
    assert len(LineageWorker(s, "main").tokenizer) == vocab["tokens"][1]


def lora_b_norm(w: LineageWorker) -> float:
    """How far the live adapter has moved from its start (LoRA's B factors start at zero)."""
    return sum(float(p.detach().norm()) for n, p in w.learner.model.named_parameters() if "lora_B" in n)


def test_a_background_reduction_carries_over_what_was_learned_meanwhile(tmp_path, tiny_model):
    """Snapshot, learning goes on, the reducer's candidate is adopted: the interactions learned meanwhile are
    learned again on the new generation's fresh adapter, and none is counted or recorded twice."""
    from daemon.snapshots import run_reduction

    s = settings(tmp_path, tiny_model, reduce_budget=5.0, gate="off")
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(24))
    snap = w.snapshot("command")
    assert w.state()["reduction_pending"]["id"] == snap.id and w.dir.current() == "gen-0000"
    meanwhile = w.learn(items(16, start=24))  # the learner goes on while the reducer works
    assert meanwhile.learned > 0 and len(w.since_snapshot) == meanwhile.learned
    learned_before, ledger_before = w.counters["interactions_learned"], w.ledger.count()
    result = run_reduction(snap, s)  # what the reducer actor runs, on the snapshot's folder only
    assert result.outcome == "candidate" and w.dir.current() == "gen-0000"
    rep = w.finish_reduction(snap, result)
    assert rep.outcome == "promoted" and w.dir.current() == rep.generation == w.generation == "gen-0001"
    assert rep.card["reduction"]["snapshot"]["id"] == snap.id and rep.card["parent"] == "main/gen-0000"
    # Relearned, not learned again: the fresh adapter has moved, the counts and the ledger have not.
    assert lora_b_norm(w) > 0 and w.counters["update_steps"] > meanwhile.steps
    assert w.counters["interactions_learned"] == learned_before and w.ledger.count() == ledger_before
    assert w.ledger.count("learned") == learned_before
    assert w.pending is None and w.state()["reduction_pending"] is None
    assert not (w.dir.live_target() / "since-snapshot.json").exists() and not os.path.exists(snap.path)
    again = w.learn(items(8, start=24))  # a redelivery of what was learned meanwhile: duplicates
    assert again.duplicates == 8 and again.learned == 0


def test_a_kill_during_the_adoption_is_finished_by_the_restart(tmp_path, tiny_model):
    """Killed after CURRENT names the new generation but before the new adapter's checkpoint: the restarted
    learner relearns on it what was learned since the snapshot (kept in the last checkpoint)."""
    from daemon.snapshots import run_reduction

    s = settings(tmp_path, tiny_model, reduce_budget=5.0, gate="off")
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(24))
    snap = w.snapshot("command")
    meanwhile = w.learn(items(16, start=24))
    result = run_reduction(snap, s)
    learned = w.counters["interactions_learned"]
    assert meanwhile.learned > 0 and len(w.since_snapshot) == meanwhile.learned
    w._relearn = lambda rows: (_ for _ in ()).throw(KeyboardInterrupt())  # the "kill", after set_current
    with pytest.raises(KeyboardInterrupt):
        w.finish_reduction(snap, result)
    w.close()
    assert w.dir.current() == "gen-0001" and w.dir.live_state()["base"] == "gen-0000"
    w2 = LineageWorker(s, "main")
    assert w2.generation == "gen-0001" and w2.pending is None and w2.dir.live_state()["base"] == "gen-0001"
    assert lora_b_norm(w2) > 0 and w2.counters["interactions_learned"] == learned  # relearned, not recounted
    # The driver's adoption, asked again of the restarted learner, answers with the promotion that happened.
    rep = w2.finish_reduction(snap, result)
    assert rep.outcome == "promoted" and rep.generation == "gen-0001"
    assert w2.learn(items(8, start=60)).learned > 0


def test_a_reduction_the_reducer_could_not_finish_leaves_the_learner_as_it_was(tmp_path, tiny_model):
    from daemon.reports import ReductionReport

    s = settings(tmp_path, tiny_model, gate="off")
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(24))
    norm = lora_b_norm(w)
    snap = w.snapshot("command")
    failed = ReductionReport("main", "failed", "gen-0000", "gen-0000", w.n_params, w.n_params, 1.0, detail="killed")
    rep = w.finish_reduction(snap, failed)
    assert rep.outcome == "failed" and w.dir.current() == "gen-0000" and w.pending is None
    assert lora_b_norm(w) == pytest.approx(norm) and not os.path.exists(snap.path)  # the same adapter goes on
    assert w.learn(items(8, start=24)).learned > 0 and w.since_snapshot == []
    # A daemon that starts removes the snapshots of its last run (no reducer works on them): their learners
    # stop waiting.
    again = w.snapshot("command")
    w.close()
    shutil.rmtree(again.path)
    w2 = LineageWorker(s, "main")
    assert w2.pending is None and w2.dir.live_state()["reduction_pending"] is None
    assert w2.learn(items(8, start=32)).learned > 0 and w2.since_snapshot == []
