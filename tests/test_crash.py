"""Crash anywhere: kill -9 of the daemon's whole process tree at random moments (some mid-reduction),
then a restart; nothing acknowledged is lost, nothing is learned twice, the registry always loads.

A few cycles here; ``python -m bench.crash`` runs 20 and reports the counts (README)."""
from __future__ import annotations

import pytest

from bench.crash import run


@pytest.mark.timeout(1200)
def test_kill_9_at_random_moments_loses_nothing_and_learns_nothing_twice(tmp_path, tiny_model, redis_url):
    res = run(tiny_model, tmp_path / "home", redis_url, kills=4, seed=1)
    assert res["published_ids"] == 4 * 24 + 3 * 12  # 24 a cycle, 12 more before each kill outside a reduction
    assert max(res["unfinished_entries_at_each_kill"]) > 0, "every kill came after the work was done"
    assert res["learner_actor_kills"] >= 1
    assert res["lost"] == 0, res["lost_ids"]
    assert res["duplicated"] == 0
    assert res["learned"] + res["held_out"] + res["dead_lettered"] == res["published_ids"]
    assert res["registry_loads"] and res["last_exit_clean"]
