import torch

from learners.data import Example
from learners.replay import Prediction, ReplayBuffer


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


def pred(n: int, nll: float, fill: int = 0) -> Prediction:
    return Prediction(torch.full((n, 8), fill, dtype=torch.int32), torch.full((n, 8), -3.0, dtype=torch.float16), nll)


def test_a_stored_prediction_is_replaced_only_by_a_better_one_and_goes_with_its_item():
    buf = ReplayBuffer(capacity=4, seed=0)
    buf.extend([ex(i, "a") for i in range(4)])
    a0, a1 = buf.all()[0], buf.all()[1]
    assert buf.prediction(a0) is None
    assert buf.remember({a0.id: pred(3, 2.0), "not-stored": pred(3, 0.1)}, "gen-0") == 1
    assert buf.remember({a0.id: pred(3, 2.5, fill=1)}, "gen-0") == 0  # worse: the old one stays
    assert int(buf.prediction(a0).tokens[0, 0]) == 0
    assert buf.remember({a0.id: pred(3, 1.5, fill=2), a1.id: pred(2, 9.0)}, "gen-0") == 2
    assert int(buf.prediction(a0).tokens[0, 0]) == 2 and buf.prediction(a0).nll == 1.5
    for i in range(4, 400):  # the reservoir replaces a0 and a1 in time: their predictions go with them
        buf.add(ex(i, "a"))
    kept = {e.id for e in buf.all()}
    assert all((buf.prediction(e) is not None) == (e.id in {a0.id, a1.id}) for e in buf.all())
    assert not {a0.id, a1.id} <= kept and len(buf._predictions) == len({a0.id, a1.id} & kept)
    # Another generation's predictions are no teacher for this one: they are dropped.
    buf.remember({}, "gen-1")
    assert all(buf.prediction(e) is None for e in buf.all())


def test_predictions_round_trip_through_safetensors_for_their_generation_only(tmp_path):
    buf = ReplayBuffer(capacity=10, seed=0)
    buf.extend([ex(i, "a") for i in range(5)])
    items = buf.all()
    buf.remember({items[0].id: pred(3, 1.25, fill=7), items[2].id: pred(5, 0.5, fill=9)}, "gen-2")
    buf.save_predictions(tmp_path / "p.safetensors")
    clone = ReplayBuffer.from_json(buf.to_json())
    clone.load_predictions(tmp_path / "p.safetensors", "gen-2")
    for e in items:
        a, b = buf.prediction(e), clone.prediction(e)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp, b.logp) and a.nll == b.nll
    other = ReplayBuffer.from_json(buf.to_json())
    other.load_predictions(tmp_path / "p.safetensors", "gen-3")
    assert all(other.prediction(e) is None for e in items)
    empty = ReplayBuffer(capacity=3)
    empty.save_predictions(tmp_path / "e.safetensors")
    empty.load_predictions(tmp_path / "e.safetensors", "")
    assert len(empty) == 0
