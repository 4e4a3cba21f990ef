"""Phased fine-tuning and self-tuning: the policies alone, then inside a lineage's learner."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings as hsettings
from hypothesis import strategies as st

from daemon.config import SettingsError, load_settings
from daemon.foundation import ensure_foundation
from daemon.lineage import LineageWorker
from daemon.registry import Registry
from policies.schedule import Phase, parse_phases
from policies.tuning import Bounds, Knobs, SelfTuner, Signal
from tests.test_registry import items, poison

WARMUP = "warmup: steps=4, modules=q_proj+v_proj, lr_scale=0.5, replay_ratio=0.6; full"


def test_a_schedule_parses_and_switches_at_its_boundaries():
    s = parse_phases(WARMUP)
    assert s.phases == (Phase("warmup", 4, frozenset({"q_proj", "v_proj"}), 0.5, 0.6), Phase("full"))
    assert [s.at(n)[1].name for n in (0, 3, 4, 100)] == ["warmup", "warmup", "full", "full"]
    three = parse_phases("a: steps=2; b: steps=3, modules=all; c")
    assert [three.at(n)[0] for n in (0, 1, 2, 4, 5, 9)] == [0, 0, 1, 1, 2, 2]
    assert three.phases[1].modules is None
    assert parse_phases("").names == ["full"]


@pytest.mark.parametrize("text,words", [
    ("warmup: modules=q_proj; full", "needs steps"),
    ("warmup: steps=4, modules=attn; full", "unknown modules"),
    ("warmup: steps=4, speed=2; full", "is not one of"),
    ("warmup: steps=0; full", "bad steps"),
    ("warmup: steps=4, lr_scale=-1; full", "bad lr_scale"),
    ("warmup: steps=4, replay_ratio=1.5; full", "bad replay_ratio"),
    ("a: steps=2; a", "appears twice"),
    ("a: steps=2; b: steps=3", "runs on"),
    ("../x: steps=2; full", "phase name"),
])
def test_a_bad_schedule_fails_at_start_naming_the_setting(tmp_path, text, words):
    with pytest.raises(ValueError, match=words):
        parse_phases(text)
    with pytest.raises(SettingsError, match="CASCADE_PHASES"):
        load_settings(home=tmp_path, phases=text)


BOUNDS = Bounds((1e-4, 4e-4), (0.2, 0.7), (0.1, 2.0))


def test_forgetting_moves_every_knob_towards_keeping_what_was_known():
    t = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, forgetting_target=0.05, cooldown=0)
    assert t.observe(Signal(forgetting=0.0, rolled_back=False, arriving={"a": 2.0})) == []
    changes = {c.knob: c for c in t.observe(Signal(forgetting=0.4, rolled_back=False, arriving={"a": 1.5}))}
    assert set(changes) == {"learning_rate", "replay_ratio", "distill_weight"}
    assert changes["learning_rate"].new < 4e-4 and changes["learning_rate"].direction == "down"
    assert changes["replay_ratio"].new > 0.4 and changes["distill_weight"].new > 0.5
    assert "forgetting" in changes["learning_rate"].reason
    assert t.knobs == Knobs(changes["learning_rate"].new, changes["replay_ratio"].new, changes["distill_weight"].new)


def test_a_rollback_acts_at_once_even_in_the_cooldown():
    t = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, cooldown=10)
    t.observe(Signal(0.0, True, {"a": 2.0}))
    lr = t.knobs.learning_rate
    changes = t.observe(Signal(0.0, True, {"a": 2.0}))
    assert changes and t.knobs.learning_rate < lr and "rolled" in changes[0].reason


def test_a_plateau_of_the_arriving_sources_held_out_loss_anneals_the_rate_and_a_falling_one_does_not():
    t = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, patience=3, cooldown=0, min_gain=0.01)
    seen = [t.observe(Signal(0.001, False, {"a": 2.0 + 0.001 * (i % 2)})) for i in range(4)]
    assert seen[:3] == [[], [], []] and [c.knob for c in seen[3]] == ["learning_rate"]
    assert seen[3][0].direction == "down" and "improved" in seen[3][0].reason
    assert t.knobs.replay_ratio == 0.4 and t.knobs.distill_weight == 0.5  # only the rate anneals
    # a held-out loss still falling is left alone, however flat the training loss
    t2 = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, patience=3, cooldown=0)
    assert all(t2.observe(Signal(0.001, False, {"a": 2.0 - 0.05 * i})) == [] for i in range(10))
    # so is a source without held-out items (no level: no evidence of a plateau either way)
    t3 = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, patience=3, cooldown=0)
    assert [c for i in range(6) for c in t3.observe(Signal(0.001, False, {"a": math.nan}))] == []


def test_a_new_source_restores_the_operators_rate_and_the_rate_never_goes_above_it():
    t = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, patience=2, cooldown=0)
    for _ in range(8):  # "a" plateaus: annealed twice or more
        t.observe(Signal(0.0, False, {"a": 2.0}))
    assert t.knobs.learning_rate < 0.5 * 4e-4
    changes = t.observe(Signal(0.0, False, {"b": 3.0}))
    assert [(c.knob, c.new) for c in changes] == [("learning_rate", 4e-4)]
    assert "new source arrived (b)" in changes[0].reason
    assert t.observe(Signal(0.0, False, {"b": 2.5})) == []  # b is learning: left alone
    for _ in range(20):
        t.observe(Signal(0.0, False, {"b": 2.5}))
        t.observe(Signal(0.0, False, {"c": 2.5}))  # back and forth: each window's source seen within patience
        assert t.knobs.learning_rate <= 4e-4


def test_the_cooldown_spaces_changes_out():
    t = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, cooldown=3)
    acted = [bool(t.observe(Signal(1.0, False, {"a": 2.0}))) for _ in range(9)]
    assert acted == [True, False, False, False, True, False, False, False, True]


@hsettings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5) | st.just(math.nan), st.booleans(),
                          st.dictionaries(st.sampled_from("abc"), st.floats(0, 10) | st.just(math.nan), max_size=3)),
                min_size=1, max_size=80))
def test_the_tuner_never_leaves_its_bounds(signals):
    t = SelfTuner(Knobs(4e-4, 0.4, 0.5), BOUNDS, cooldown=0, patience=2)
    for f, rb, arriving in signals:
        for c in t.observe(Signal(f, rb, arriving)):
            lo, hi = getattr(BOUNDS, c.knob)
            assert lo <= c.new <= hi and c.new != c.old
        for name in ("learning_rate", "replay_ratio", "distill_weight"):
            lo, hi = getattr(BOUNDS, name)
            assert lo <= getattr(t.knobs, name) <= hi and math.isfinite(getattr(t.knobs, name))


def test_self_tuning_bounds_must_hold_the_set_values(tmp_path):
    with pytest.raises(SettingsError, match="CASCADE_TUNE_LR_MIN"):
        load_settings(home=tmp_path, self_tuning="on", learning_rate=1e-5)
    with pytest.raises(SettingsError, match="CASCADE_TUNE_REPLAY_MIN/MAX"):
        load_settings(home=tmp_path, self_tuning="on", replay_ratio=0.9)
    load_settings(home=tmp_path, self_tuning="off", learning_rate=1e-5)  # bounds only matter when on


def lora_by_module(w: LineageWorker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in w.learner.params.items()}


def changed_modules(before, w) -> set[str]:
    out = set()
    for n, p in w.learner.params.items():
        if not torch.equal(before[n], p):
            out.add(next(m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                          if f".{m}." in n))
    return out


def test_the_learner_follows_its_phases_and_starts_them_again_after_a_restart(tmp_path, tiny_model):
    s = load_settings(home=tmp_path / "home", base_model=tiny_model, batch_size=4, max_seq_len=32,
                      learning_rate=2e-3, window_steps=2, reduce_every=0, gate="off", replay_ratio=0.25,
                      constraints="replay", phases=WARMUP)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    first = w.window_items()  # the driver asks the learner its first window's size
    reports, n, start = [], first, 0
    for k in range(3):
        before = lora_by_module(w)
        rep = w.learn(items(n, start))
        reports.append((rep, changed_modules(before, w)))
        start, n = start + n, rep.window  # then what the learner asks for, as the driver does
    (r1, m1), (r2, m2), (r3, m3) = reports
    # Warm-up: 0.6 replay (batch 4 -> 2 new rows a step), half the rate, only q and v trained; it ends at
    # the first window starting at or after 4 steps. Every window is window_steps steps, sized by the learner
    # for the phase it is in (the configured 0.25 replay would be 3 new rows a step: 6 a window).
    assert first == 4 and r1.window == 4 and r3.window == 6
    assert r1.steps == r2.steps == r3.steps == s.window_steps == 2
    assert r1.phase == r2.phase == "warmup" and r3.phase == "full"
    assert r1.knobs == {"learning_rate": pytest.approx(1e-3), "replay_ratio": 0.6, "distill_weight": 0.5}
    assert m1 == m2 == {"q_proj", "v_proj"}
    assert r3.knobs["learning_rate"] == pytest.approx(2e-3) and r3.knobs["replay_ratio"] == 0.25
    assert m3 == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert w.state()["phase"] == "full"
    w.close()
    again = LineageWorker(s, "main")  # the adapter's step count is checkpointed: still in "full"
    assert again.learn(items(6, start)).phase == "full"
    again.close()


def test_a_lineage_tunes_itself_after_a_rollback_and_keeps_the_tuned_values(tmp_path, tiny_model):
    s = load_settings(home=tmp_path / "home", base_model=tiny_model, batch_size=4, max_seq_len=32,
                      learning_rate=0.05, heldout_fraction=0.5, gate_step_budget=0.01, constraints="none",
                      reduce_every=0, self_tuning="on", curation="none")  # the poison is junk
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn(items(120))
    rep = w.learn(poison())
    assert rep.rollback is not None
    lr = next(c for c in rep.tuning if c.knob == "learning_rate")
    assert lr.old == 0.05 and lr.new < 0.05 and "rolled the window back" in lr.reason
    assert w.learn(items(8, 200)).knobs["learning_rate"] == pytest.approx(lr.new)
    tuned = w.knobs()  # as the tuner left them after that window
    w.close()
    again = LineageWorker(s, "main")
    assert again.knobs() == tuned and tuned.learning_rate < 0.05
    again.close()
