"""The held-out gate that trades: noise-aware per-source changes, a cumulative bound, retries under
stronger protection, deferral, and harmful content set aside."""
from __future__ import annotations

import random

import pytest
import torch

from daemon.foundation import ensure_foundation
from daemon.lineage import LineageWorker
from daemon.registry import Registry
from daemon.schema import Interaction
from learners.update import item_losses
from daemon.heldout import HeldoutLosses
from learners.data import Example
from policies.gate import Measured, Protection, judge_window, settled, stronger
from tests.test_registry import items, poison, settings


def measured(before: float, after: float, n: int = 16, jitter: float = 0.02, seed: int = 0) -> Measured:
    """``n`` items of 10 tokens whose mean loss moves from ``before`` to ``after``, each with its own noise."""
    rng = random.Random(seed)
    level = [rng.gauss(0, 0.3) for _ in range(n)]
    move = [rng.gauss(0, jitter) for _ in range(n)]
    b = [10 * (before + x - sum(level) / n) for x in level]  # items differ; the mean is ``before``
    a = [y + 10 * (after - before + m - sum(move) / n) for y, m in zip(b, move)]
    return Measured(tuple(b), tuple(a), (10,) * n)


# -- the policy: numbers in, a decision out -------------------------------------------------------------
def test_noise_alone_is_accepted():
    same = measured(2.0, 2.0, jitter=0.0)
    assert same.delta == 0 and same.noise == 0
    assert judge_window({"old": same, "new": same}, {"new"}, {"old": 1.9, "new": 2.0}).accept
    # Re-measured with item-level noise of its own, the mean may move a little: within noise, not a change.
    wobble = measured(2.0, 2.0 + 0.01, jitter=0.05)  # +- 0.0125
    assert wobble.delta > 0 and judge_window({"old": wobble}, set(), {"old": 1.86}, total_budget=0.1).accept


def test_a_window_may_cost_an_old_source_within_its_bound_while_the_new_one_gains():
    # 0.09 nats on the old source in one window: the old fixed step budget (0.05) refused this.
    d = judge_window({"old": measured(2.0, 2.09), "new": measured(3.0, 2.8)}, {"new"}, {"old": 2.0, "new": 3.0},
                     total_budget=0.15)
    assert d.accept and d.verdict == "ok" and d.deltas["old"] == pytest.approx(0.09, abs=0.01)


def test_a_source_over_its_cumulative_bound_makes_the_window_costly():
    d = judge_window({"old": measured(2.1, 2.2), "new": measured(3.0, 2.8)}, {"new"}, {"old": 2.0},
                     total_budget=0.15)
    assert not d.accept and d.verdict == "costly" and d.reason == "forgetting" and d.hurt == ("old",)


def test_a_large_rise_in_one_window_is_harmful():
    d = judge_window({"old": measured(2.0, 2.6), "new": measured(3.0, 1.0)}, {"new"}, {"old": 2.0},
                     total_budget=5.0, harm_budget=0.25)
    assert not d.accept and d.verdict == "harmful" and d.reason == "harm"


def test_a_window_that_makes_its_own_source_worse_is_tried_again_more_carefully():
    d = judge_window({"new": measured(3.0, 3.1)}, {"new"}, {}, harm_budget=1.0)
    assert d.verdict == "costly" and d.reason == "self_harm" and d.hurt == ("new",)


def test_a_nonfinite_loss_is_harmful():
    bad = Measured((1.0, 1.0), (float("nan"), 1.0), (1, 1))
    assert judge_window({"x": bad}, set(), {}).reason == "nonfinite"


def test_a_rise_within_the_noise_of_few_noisy_items_is_not_a_change():
    noisy = measured(2.0, 2.3, n=3, jitter=1.0, seed=3)
    assert noisy.delta == pytest.approx(0.3) and noisy.noise * 2 > noisy.delta
    assert judge_window({"old": noisy}, set(), {"old": 2.0}, total_budget=0.15, harm_budget=0.2).accept


def test_protection_grows_with_each_refusal():
    p = stronger(stronger(Protection(), ("a",)), ("b",))
    assert (p.level, p.lr_factor, p.distill_factor, p.prefer) == (2, 0.25, 4.0, ("a", "b"))


# -- the worker: retries, deferral, refusal, fates ----------------------------------------------------------
def test_a_share_of_items_settles_a_quiet_source_but_not_one_that_may_be_over_a_bound():
    kw = dict(total_budget=0.15, harm_budget=0.25, z=2.0)
    quiet = measured(2.0, 2.01, n=8)
    assert settled(quiet, 2.0, arriving=False, **kw)
    assert not settled(quiet, 2.0, arriving=True, **kw)  # an arriving source must be seen not to rise
    assert settled(measured(2.0, 1.8, n=8), 2.0, arriving=True, **kw)
    assert not settled(measured(2.0, 2.3, n=8), 2.0, arriving=False, **kw)  # may be harmed
    assert not settled(quiet, 1.87, arriving=False, **kw)  # may be over its bound: 2.01 + noise vs 1.87 + 0.15
    assert not settled(measured(2.0, 2.01, n=1), None, arriving=False, **kw)  # one item has no noise
    # A share is compared with the reference through the loss of all the source's items before the window.
    share = Measured(quiet.nll_before, quiet.nll_after, quiet.tokens, before_all=1.5)
    assert share.after == pytest.approx(1.5 + quiet.delta) and settled(share, 1.45, arriving=False, **kw)


class Losses:
    """A model whose loss on an item is its ``base`` plus ``shift`` (per source), counted per call."""

    def __init__(self, sources: dict[str, int]):
        self.items = {d: [Example(f"{d}{i}", "p", "r", domain=d) for i in range(n)] for d, n in sources.items()}
        self.base = {ex.id: 2.0 + 0.1 * (i % 5) for v in self.items.values() for i, ex in enumerate(v)}
        self.shift = {d: 0.0 for d in sources}
        self.accepted = dict(self.shift)

    def measure(self, v, shift=None):
        shift = self.shift if shift is None else shift
        return [10 * (self.base[e.id] + shift[e.domain] + 0.001 * (sum(map(ord, e.id)) % 7)) for e in v], [10] * len(v)

    def measure_accepted(self, v):
        return self.measure(v, self.accepted)


def window(h: HeldoutLosses, m: Losses, judged=None, arriving=frozenset(), accept=True):
    measured, pending = h.measure_window(m.items, m.measure, m.measure_accepted, set(judged or m.items),
                                         set(arriving), {d: 2.2 for d in m.items})
    if accept:
        h.accept(pending)
        m.accepted = dict(m.shift)
    return measured


def test_a_quiet_window_is_measured_on_a_share_and_made_exact_every_few_windows():
    m = Losses({"a": 32, "b": 32})
    h = HeldoutLosses(first_items=8, exact_every=3)
    assert h.refresh(m.items, m.measure) == {"a", "b"} and h.items_measured == 64
    levels = {d: x.level for d, x in h.sources.items()}
    m.shift["a"] = 0.01  # the kept source moves a little, the same on every item
    got = window(h, m)
    assert h.items_measured == 64 + 16 and all(x.before_all is not None for x in got.values())
    assert h.sources["a"].level == pytest.approx(levels["a"] + 0.01) and not h.sources["a"].exact
    assert h.sources["a"].stale == set(range(8, 32))
    window(h, m)
    assert h.items_measured == 64 + 32
    window(h, m)  # the third accepted window since the last exact level: the rest measured too
    assert h.items_measured == 64 + 32 + 64
    assert all(s.exact and not s.stale for s in h.sources.values())
    assert {d: x.level for d, x in h.sources.items()} == pytest.approx({d: sum(m.measure(v)[0]) / (10 * len(v)) for d, v in m.items.items()})


def test_an_unsettled_source_is_judged_on_every_item_paired_with_the_accepted_losses():
    m = Losses({"a": 32, "b": 32})
    h = HeldoutLosses(first_items=8, exact_every=10)
    h.refresh(m.items, m.measure)
    m.shift["a"] = 0.02
    window(h, m)  # accepted, estimated: items 8.. of both sources are stale
    m.shift["a"] = 0.5  # a harmful window on "a"
    n0 = h.items_measured
    got = window(h, m, accept=False)
    # "a": its share, its 24 stale items again under the accepted weights, and its rest; "b": its share.
    assert h.items_measured - n0 == 8 + 24 + 24 + 8
    assert got["a"].before_all is None and len(got["a"].tokens) == 32
    assert got["a"].delta == pytest.approx(0.48)  # paired with the accepted adapter's losses, not older ones
    assert not judge_window(got, set(), {"a": 2.2, "b": 2.2}).accept
    # Rolled back: the stale items measured again stay the accepted adapter's, the rest still stale.
    assert h.sources["a"].stale == set() and h.sources["b"].stale == set(range(8, 32))
    assert h.sources["a"].exact and h.sources["a"].level == pytest.approx(sum(m.measure_accepted(m.items["a"])[0]) / 320)


def test_a_changed_held_out_set_measures_only_its_new_items_and_estimates_the_stale_ones():
    m = Losses({"a": 16})
    h = HeldoutLosses(first_items=4, exact_every=10)
    h.refresh(m.items, m.measure)
    m.shift["a"] = 0.01
    window(h, m)
    m.items["a"][2] = Example("a-new", "p", "r", domain="a")
    m.base["a-new"] = 3.0
    h.changed("a", 2)
    n0 = h.items_measured
    assert h.refresh(m.items, m.measure) == {"a"}
    assert h.items_measured - n0 == 1 and h.sources["a"].stale == set(range(4, 16))
    # The stale items moved as the level says they did (here every item moved alike): the estimate is exact.
    assert h.sources["a"].level == pytest.approx(sum(m.measure(m.items["a"])[0]) / 160)
    m.items["a"][9] = Example("a-new2", "p", "r", domain="a")  # a stale item replaced
    m.base["a-new2"] = 1.0
    h.changed("a", 9)
    h.refresh(m.items, m.measure)
    assert h.sources["a"].stale == set(range(4, 16)) - {9}
    assert h.sources["a"].level == pytest.approx(sum(m.measure(m.items["a"])[0]) / 160)


def test_a_sequential_gate_still_refuses_a_poisoned_burst_and_costs_less_on_quiet_windows(tmp_path, tiny_model):
    w = worker(tmp_path, tiny_model, learning_rate=0.05, heldout_fraction=0.5, gate_step_budget=0.01,
               constraints="none", curation="none", gate_first_items=8, gate_exact_every=1000)
    first = w.learn(items(120))
    assert sum(len(v) for v in w.heldout.values()) > 8
    rep = w.learn(poison())
    assert rep.rollback == "harm" and rep.learned == 0 and {x["reason"] for x in rep.refused} == {"harmful"}
    q = worker(tmp_path / "q", tiny_model, learning_rate=1e-5, heldout_fraction=0.5, gate_first_items=8, curation="none",
               gate_exact_every=1000)
    q.learn(items(120))
    quiet = q.learn([i for i in items(40, start=400) if not q._is_heldout(i.example())])
    held = sum(len(v) for v in q.heldout.values())
    assert quiet.rollback is None and quiet.learned > 0
    assert quiet.gate_items == 8 * len(q.heldout) < held  # a share of each source, nothing measured before
    fates_add_up(w, [first, rep])


def other(n: int, start: int = 500, domain: str = "e") -> list[Interaction]:
    return [Interaction(entry_id=f"{start + i}-0", id=f"{domain}{i}", prompt=f"Note {i}:",
                        response=f" the quick brown fox {i % 5} jumps.", meta={"domain": domain})
            for i in range(n)]


def worker(tmp_path, tiny_model, **kw) -> LineageWorker:
    s = settings(tmp_path, tiny_model, **kw)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    return LineageWorker(s, "main")


def fates_add_up(w: LineageWorker, reps) -> None:
    received = sum(len(r.ack) for r in reps)  # a window acknowledges every interaction it received
    settled = sum(r.duplicates + r.heldout_added + r.learned - r.redeemed + r.deferred for r in reps)
    refused_new = sum(sum(1 for x in r.refused if x["reason"] == "harmful") for r in reps)
    assert received == settled + refused_new


def test_a_costly_window_is_retried_under_stronger_protection_and_ends_learned(tmp_path, tiny_model):
    # The old source may barely move (0.01 nats): the first try at this rate moves it far more; each retry
    # halves the rate, doubles distillation and replays the old source, until the window fits.
    w = worker(tmp_path, tiny_model, learning_rate=0.05, heldout_fraction=0.3, gate_total_budget=0.01,
               gate_step_budget=50, gate_retries=8, gate_min_items=4, heldout_per_domain=64)
    first = w.learn(items(60))
    assert first.learned > 0 and len(w.heldout["d"]) >= 4
    new = [i for i in other(16) if not w._is_heldout(i.example())]
    rep = w.learn(new)
    assert rep.attempts > 1 and rep.rollbacks and set(rep.rollbacks) == {"forgetting"}
    assert rep.rollback == "forgetting" and rep.learned == len(new) and rep.deferred == 0
    assert w.ledger.count("learned") == first.learned + len(new)
    assert w.counters["rollbacks"] == len(rep.rollbacks)
    fates_add_up(w, [first, rep])


def test_a_large_one_window_rise_is_retried_and_learned_when_a_careful_try_fits(tmp_path, tiny_model):
    # The first try raises the old source past the step budget; learned at a lower rate it does not: a new
    # topic's first windows are not set aside as harmful for what a careful try does not do.
    w = worker(tmp_path, tiny_model, learning_rate=0.05, heldout_fraction=0.3, gate_total_budget=50,
               gate_step_budget=0.01, gate_retries=8, gate_min_items=4, heldout_per_domain=64)
    first = w.learn(items(60))
    new = [i for i in other(16) if not w._is_heldout(i.example())]
    rep = w.learn(new)
    assert rep.attempts > 1 and set(rep.rollbacks) == {"harm"}
    assert rep.learned == len(new) and not rep.refused and rep.deferred == 0
    assert w.ledger.count("learned") == first.learned + len(new) and w.ledger.count("refused") == 0
    fates_add_up(w, [first, rep])


def test_a_deferred_interaction_is_kept_and_learned_once_it_fits(tmp_path, tiny_model):
    kw = dict(learning_rate=0.05, heldout_fraction=0.3, gate_step_budget=50, gate_retries=0, gate_min_items=4,
              heldout_per_domain=64, gate_noise_z=0)
    w = worker(tmp_path, tiny_model, gate_total_budget=0.001, **kw)
    first = w.learn(items(60))
    ref = {n: p.detach().clone() for n, p in w.learner.params.items()}
    new = [i for i in other(24) if not w._is_heldout(i.example())]
    rep = w.learn(new)
    assert rep.rollback == "forgetting" and rep.learned == 0 and rep.deferred == len(new)
    assert all(torch.equal(ref[n], p) for n, p in w.learner.params.items())
    assert w.ledger.count("deferred") == len(new) and len(w.deferred) == len(new)
    fates_add_up(w, [first, rep])
    # Acknowledged and durable: a restart finds them waiting; a redelivery is a duplicate.
    w.close()
    kw.update(gate_noise_z=2.0, learning_rate=0.01)
    w = LineageWorker(settings(tmp_path, tiny_model, gate_total_budget=5.0, **kw), "main")
    assert w.deferred.ids() == [i.id for i in new]
    assert w.learn(new).duplicates == len(new)
    # Once there is room (a looser bound here), the next window learns them beside its new rows.
    later = w.learn(items(8, start=200))
    assert later.redeemed == min(len(new), w.new_per_step()) and later.rollback is None
    assert w.ledger.count("learned") == first.learned + later.learned
    assert len(w.deferred) == len(new) - later.redeemed


def test_new_traffic_does_not_wait_behind_deferred_interactions_that_still_do_not_fit(tmp_path, tiny_model):
    # A burst that costs the kept source too much is deferred; the next window carries it beside new rows
    # of the kept source, is refused, and its retry learns the new rows without it: the burst waits on.
    kw = dict(learning_rate=0.05, heldout_fraction=0.3, gate_step_budget=50, gate_min_items=4,
              heldout_per_domain=64, gate_noise_z=0, gate_total_budget=0.05, constraints="none", curation="none")
    w = worker(tmp_path, tiny_model, gate_retries=0, **kw)
    first = w.learn(items(60))
    burst = w.learn(poison())
    assert burst.rollback == "forgetting" and burst.deferred > 0 and burst.learned == 0
    waiting = w.deferred.ids()
    w.close()
    w = LineageWorker(settings(tmp_path, tiny_model, gate_retries=1, **kw), "main")
    new = [i for i in items(8, start=300) if not w._is_heldout(i.example())]
    rep = w.learn(new)
    assert rep.attempts == 2 and rep.rollbacks == ["forgetting"]
    assert rep.learned == len(new) and rep.redeemed == 0
    assert sorted(w.deferred.ids()) == sorted(waiting)  # still waiting (those it carried one try older)
    assert w.ledger.count("learned") == first.learned + len(new)
    fates_add_up(w, [first, burst, rep])


def test_a_poisoned_burst_is_refused_as_harmful_and_set_aside(tmp_path, tiny_model):
    w = worker(tmp_path, tiny_model, learning_rate=0.05, heldout_fraction=0.5, gate_step_budget=0.01,
               constraints="none", curation="none")  # the gate alone must catch it (curation would skip it)
    first = w.learn(items(120))
    ref = {n: p.detach().clone() for n, p in w.learner.params.items()}
    rep = w.learn(poison())
    assert rep.rollback == "harm" and rep.learned == 0 and rep.deferred == 0
    assert all(torch.equal(ref[n], p) for n, p in w.learner.params.items())
    n_train = len(rep.ack) - rep.heldout_added
    assert len(rep.refused) == n_train and {x["reason"] for x in rep.refused} == {"harmful"}
    assert w.ledger.count("refused") == n_train and w.counters["refused"] == n_train
    assert all(x["response"].startswith("@@@@") for x in rep.refused)
    fates_add_up(w, [first, rep])


def test_the_same_adapter_measured_twice_passes_the_gate(tmp_path, tiny_model):
    w = worker(tmp_path, tiny_model, heldout_fraction=0.5)
    w.learn(items(40))
    sets = w.heldout_items
    a = {d: item_losses(w.learner.model, w.tokenizer, v, 32) for d, v in sets.items()}
    b = {d: item_losses(w.learner.model, w.tokenizer, v, 32) for d, v in sets.items()}
    m = {d: Measured(tuple(a[d][0]), tuple(b[d][0]), tuple(b[d][1])) for d in sets}
    assert judge_window(m, set(sets), w.best, total_budget=1e-6).accept


def test_a_window_reports_where_its_time_went(tmp_path, tiny_model):
    """Every phase of a window (curation, the gate's measurements, the step's parts, the checkpoint) is
    timed, retries included, and the phases never add up to more than the window took."""
    w = worker(tmp_path, tiny_model, heldout_fraction=0.3, gate_min_items=2)
    w.learn(items(30))
    rep = w.learn(other(16))
    phases = {"curate", "gate_before", "replay", "gate_after", "checkpoint", "step.batch", "step.forward",
              "step.teacher", "step.head_loss", "step.backward", "step.optimizer"}
    assert phases <= set(rep.seconds) and all(v >= 0 for v in rep.seconds.values())
    assert rep.seconds["step.forward"] > 0 and rep.seconds["gate_after"] > 0 and rep.seconds["checkpoint"] > 0
    assert sum(rep.seconds.values()) <= rep.update_seconds
