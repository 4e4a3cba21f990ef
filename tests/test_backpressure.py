"""Backpressure: a producer far faster than learning. The daemon reads only as fast as it learns
(entries delivered but not yet acknowledged stay bounded by CASCADE_MAX_BUFFERED plus the window in
flight), the lag is visible in /metrics, and nothing is dropped."""
from __future__ import annotations

import time

import redis

from daemon.stream import group_info
from tests.conftest import metric_value, settings_env, wait_drained

STREAM, GROUP = "cascade:interactions", "cascade"


def test_a_fast_producer_is_read_at_the_pace_of_learning_and_nothing_is_dropped(tmp_path, tiny_model, redis_url,
                                                                               daemon_factory):
    home = tmp_path / "home"
    env = settings_env(home, tiny_model, redis_url, max_buffered=16, window_steps=1, read_count=64)
    d = daemon_factory(env)
    d.wait_healthy()
    r = redis.Redis.from_url(redis_url)
    n = 300
    pipe = r.pipeline()
    for i in range(n):
        pipe.xadd(STREAM, {"prompt": f"Item {i} weighs", "response": f" {i % 9} kg.", "id": f"bp-{i}"})
    pipe.execute()  # the whole burst is in the stream before the daemon has learned much of it

    window = 8 - round(8 * 0.4)  # new rows per step of a batch of 8 with 40% replay, one step a window
    max_pending, max_lag_metric = 0, 0.0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        info = group_info(r, STREAM, GROUP)
        max_pending = max(max_pending, info.pending)
        text = d.metrics()
        if "\ncascade_stream_lag{" in text:  # exported from the first stream-info poll on
            max_lag_metric = max(max_lag_metric, metric_value(text, "cascade_stream_lag"))
        if info.lag == 0 and info.pending == 0:
            break
        time.sleep(0.2)
    wait_drained(r, STREAM, GROUP, proc=d)
    # Read at the pace of learning: never more than the buffer plus the window being learned (and the
    # one whose acknowledgement is on its way) is held unacknowledged.
    assert 0 < max_pending <= 16 + 2 * window, max_pending
    assert max_lag_metric > n / 2  # the backlog is visible to operators
    m = d.metrics()
    learned = metric_value(m, "cascade_interactions_learned_total", lineage="main")
    heldout = metric_value(m, "cascade_interactions_heldout_total", lineage="main")
    assert learned + heldout == n and r.xlen(f"{STREAM}:dead") == 0
    assert d.terminate() == 0
