"""Consumer group, reclaim and dead letters against real Redis servers (7 on TCP, 6.2 embedded)."""
from __future__ import annotations

import time

import redis

from daemon.embedded_redis import EmbeddedRedis
from daemon.stream import StreamConsumer, connect, group_info


def test_group_is_created_from_zero_so_earlier_entries_are_read(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.xadd("s", {"prompt": "", "response": "early"})
    c = StreamConsumer(r, "s", "g", "c1")
    c.ensure_group()
    c.ensure_group()  # idempotent
    got = c.read(10, 100)
    assert [f[b"response"] for _, f in got] == [b"early"]
    assert group_info(r, "s", "g").pending == 1
    c.ack([got[0][0]])
    info = group_info(r, "s", "g")
    assert (info.lag, info.pending) == (0, 0)


def test_pending_entries_of_a_dead_consumer_are_reclaimed(redis_url):
    r = redis.Redis.from_url(redis_url)
    for i in range(5):
        r.xadd("s", {"prompt": "", "response": f"r{i}"})
    dead = StreamConsumer(r, "s", "g", "dead")
    dead.ensure_group()
    assert len(dead.read(5, 100)) == 5  # read, never acknowledged
    # Idle for far less than a minute, however slow this machine is: not claimed.
    patient = StreamConsumer(r, "s", "g", "alive", claim_idle_ms=60_000)
    patient._own_pending_done = True
    assert patient.read(10, 50) == []
    # Idle for at least 100 ms once the sleep returns (Redis counts from the delivery, made before it): claimed.
    alive = StreamConsumer(r, "s", "g", "alive", claim_idle_ms=100)
    alive._own_pending_done = True
    time.sleep(0.15)
    got = alive.read(10, 50)
    assert len(got) == 5
    alive.ack([e for e, _ in got])
    assert group_info(r, "s", "g").pending == 0


def test_a_restarted_consumer_rereads_its_own_pending_first_and_skips_in_flight(redis_url):
    r = redis.Redis.from_url(redis_url)
    ids = [r.xadd("s", {"prompt": "", "response": f"r{i}"}).decode() for i in range(3)]
    c = StreamConsumer(r, "s", "g", "same")
    c.ensure_group()
    c.read(3, 50)
    again = StreamConsumer(r, "s", "g", "same")
    assert [e for e, _ in again.read(10, 50, skip={ids[0]})] == ids[1:]


def test_dead_letter_copies_fields_with_reason_and_acks(redis_url):
    r = redis.Redis.from_url(redis_url)
    eid = r.xadd("s", {"prompt": "p", "reason": "mine"}).decode()
    c = StreamConsumer(r, "s", "g", "c")
    c.ensure_group()
    (got_id, fields), = c.read(1, 50)
    c.dead_letter(got_id, fields, "missing_field", "required field 'response' is missing")
    (_, dead), = r.xrange("s:dead")
    assert dead[b"source_id"].decode() == eid and dead[b"reason"] == b"missing_field"
    assert dead[b"prompt"] == b"p" and dead[b"orig_reason"] == b"mine" and dead[b"detail"]
    assert group_info(r, "s", "g").pending == 0


def test_embedded_redis_62_persists_and_reports_lag(tmp_path):
    e = EmbeddedRedis(tmp_path).start()
    try:
        r = connect(e.url)
        assert r.info("server")["redis_version"].startswith("6.2")
        c = StreamConsumer(r, "s", "g", "c")
        c.ensure_group()
        for i in range(4):
            r.xadd("s", {"prompt": "", "response": str(i)})
        assert group_info(r, "s", "g").lag == 4
        got = c.read(2, 50)
        info = group_info(r, "s", "g")
        assert (info.lag, info.pending) == (2, 2)
        c.ack([g[0] for g in got])
    finally:
        e.stop()
    e2 = EmbeddedRedis(tmp_path).start()
    try:
        assert connect(e2.url).xlen("s") == 4  # the append-only file kept the stream
    finally:
        e2.stop()
    assert not e2.socket.exists()
