"""A short chaos run (bench/chaos.py): each kind of fault once, at random moments, while a producer
publishes good and hostile entries and a supervisor restarts the daemon as systemd's Restart=on-failure
would. Nothing lost, nothing learned twice, every hostile entry dead-lettered with its reason, every
fault recovered from, the registry loads. ``python -m bench.chaos`` runs it for 30 minutes."""
from __future__ import annotations

import random

import pytest

from bench.chaos import FAULTS, run
from tests.redis_servers import needs_redis_server


@needs_redis_server
@pytest.mark.timeout(900)
def test_a_short_chaos_run_loses_nothing_and_learns_nothing_twice(tmp_path, tiny_model):
    faults = random.Random(3).sample(FAULTS, len(FAULTS))
    res = run(tiny_model, tmp_path, rate=1.0, hostile=0.15, seed=3, faults=faults, gap_s=(3.0, 8.0),
              outage_s=(5.0, 8.0), recover_timeout_s=300)
    assert res["faults_injected"] == len(FAULTS) and res["not_recovered"] == 0, res["faults"]
    assert res["daemon_starts"] >= 3 and res["daemon_exits"].get("-9", 0) >= 2  # restarted as systemd would
    assert res["startup_waits_logged"] >= 1  # one start-up found Redis away and waited for it
    assert res["actor_restarts_by_ray"] >= 3  # the learner twice and the ingest actor, by Ray
    assert res["published_good"] > 30 and res["published_hostile"] > 0
    assert res["lost"] == 0, res["lost_ids"]
    assert res["learned_twice"] == 0 and res["ledger_and_checkpoint_agree"]
    assert res["ledger_ids"] == res["published_good"] and res["good_dead_lettered"] == 0
    assert res["hostile_dead_lettered"] == res["published_hostile"], res["hostile_missing"]
    assert not res["hostile_wrong_reason"]
    assert res["registry_loads"] and res["drained"] and res["last_exit_code"] == 0
