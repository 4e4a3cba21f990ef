"""Rapid adaptation: the Reptile initialization and where a lineage uses it."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from daemon.config import load_settings
from daemon.forking import fork_lineage
from daemon.foundation import ensure_foundation
from daemon.lineage import LineageWorker
from daemon.registry import Registry
from daemon.schema import Interaction
from learners.data import Example
from learners.meta import ReptileConfig, reptile
from learners.update import ContinualLearner, UpdateConfig
from policies.adaptation import MetaInitPolicy


def task(domain: str, n: int, word: str) -> list[Example]:
    return [Example(id=f"{domain}{i}", prompt=f"{domain} item {i}:", response=f" {word} {word} {i % 3}.", domain=domain)
            for i in range(n)]


def test_reptile_moves_the_start_towards_its_tasks_and_saves_a_loadable_adapter(tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tasks = {"a": task("a", 16, "alpha"), "b": task("b", 16, "beta")}
    cfg = UpdateConfig(max_seq_len=32, batch_size=4)
    out = reptile(tiny_model, tok, tasks, cfg, ReptileConfig(rounds=8, inner_steps=3, inner_lr=5e-3, batch_size=4),
                  tmp_path / "init")
    standard = ContinualLearner(tiny_model, tok, cfg)
    meta = ContinualLearner(tiny_model, tok, cfg, adapter_dir=out)
    for d, exs in tasks.items():
        assert meta.evaluate(exs) < standard.evaluate(exs) - 0.1, d
    # a fresh standard adapter changes nothing yet (LoRA's B starts at zero); the meta one does
    assert all(float(p.abs().max()) == 0 for n, p in standard.params.items() if "lora_B" in n)
    assert any(float(p.abs().max()) > 0 for n, p in meta.params.items() if "lora_B" in n)


def test_the_policy_wants_enough_sources_with_enough_items():
    p = MetaInitPolicy(enabled=True, min_tasks=2, min_items=8, max_items=10)
    assert p.tasks(task("a", 20, "x") + task("b", 7, "y")) is None  # b is too small: one task only
    got = p.tasks(task("a", 20, "x") + task("b", 8, "y"))
    assert sorted(got) == ["a", "b"] and len(got["a"]) == 10 and len(got["b"]) == 8
    assert MetaInitPolicy(enabled=False).tasks(task("a", 20, "x") + task("b", 20, "y")) is None


@pytest.mark.parametrize("meta", ["on", "off"])
def test_a_forked_lineage_starts_from_the_meta_learned_adapter_when_on(tmp_path, tiny_model, meta):
    s = load_settings(home=tmp_path / "home", base_model=tiny_model, batch_size=4, max_seq_len=32, reduce_every=0,
                      learning_rate=3e-3, gate="off", heldout_fraction=0, meta_init=meta, meta_rounds=4,
                      meta_inner_steps=2)
    registry = Registry(s.registry_root)
    ensure_foundation(registry.lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn([Interaction(entry_id=f"{i + 1}-0", id=f"i{i}", prompt=f"Item {i}:", response=f" colour {i % 3}.",
                         meta={"domain": ["shop", "fleet"][i % 2]}) for i in range(32)])
    w.close()
    fork_lineage(registry, "main/gen-0000", "niche")
    niche = LineageWorker(s, "niche")
    made = registry.lineage("niche").path / "meta-init" / "gen-0000"
    b_weights = [p for n, p in niche.learner.params.items() if "lora_B" in n]
    if meta == "on":
        assert json.loads((made / "tasks.json").read_text()) == {"fleet": 16, "shop": 16}
        assert any(float(p.abs().max()) > 0 for p in b_weights)
    else:
        assert not made.exists() and all(float(p.abs().max()) == 0 for p in b_weights)
    rep = niche.learn([Interaction(entry_id=f"{100 + i}-0", id=f"n{i}", prompt=f"Q{i}", response=" A.") for i in range(8)])
    assert rep.learned == 8
    niche.close()
