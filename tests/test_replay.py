from learners.data import Example
from learners.replay import ReplayBuffer


def ex(i: int, domain: str, size: int = 10) -> Example:
    return Example(id=f"{domain}-{i}", prompt="", response="x" * size, domain=domain)


def test_capacity_is_a_hard_bound_over_a_long_stream():
    buf = ReplayBuffer(capacity=50, seed=1)
    for i in range(10_000):
        buf.add(ex(i, "a"))
    assert len(buf) == 50
    # Reservoir: a uniform sample of the whole stream, not just the last items.
    ids = sorted(int(e.id.split("-")[1]) for e in buf.all())
    assert ids[0] < 2000 and ids[-1] > 8000


def test_old_domains_keep_their_share_when_a_new_one_floods_the_stream():
    buf = ReplayBuffer(capacity=60, seed=0)
    for i in range(100):
        buf.add(ex(i, "old"))
    for i in range(5000):
        buf.add(ex(i, "new"))
    assert buf.domains() == {"old": 30, "new": 30}
    drawn = buf.sample(40)
    assert len({e.id for e in drawn}) == 40
    assert 8 <= sum(e.domain == "old" for e in drawn) <= 32


def test_byte_bound():
    buf = ReplayBuffer(capacity=1000, max_bytes=20_000, seed=0)
    for i in range(500):
        buf.add(ex(i, "a", size=500))
    assert buf.nbytes <= 20_000 and 0 < len(buf) < 1000


def test_json_round_trip_keeps_items_counts_and_randomness():
    buf = ReplayBuffer(capacity=20, seed=3)
    for i in range(300):
        buf.add(ex(i, "a" if i % 3 else "b"))
    clone = ReplayBuffer.from_json(buf.to_json())
    assert [e.id for e in clone.all()] == [e.id for e in buf.all()]
    assert [e.id for e in clone.sample(5)] == [e.id for e in buf.sample(5)]
    clone.add(ex(999, "a"))
    buf.add(ex(999, "a"))
    assert [e.id for e in clone.all()] == [e.id for e in buf.all()]


def test_zero_capacity_keeps_nothing():
    buf = ReplayBuffer(capacity=0)
    buf.add(ex(0, "a"))
    assert len(buf) == 0 and buf.sample(3) == []
