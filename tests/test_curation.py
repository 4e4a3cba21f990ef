"""Curation: the decisions on numbers and text, the persisted near-duplicate index, and the lineage worker
that skips what is not worth learning (durably, with its reason) and learns the rest as before."""
from __future__ import annotations

import json

import pytest

from daemon.foundation import ensure_foundation
from daemon.lineage import LineageWorker
from daemon.registry import Registry
from daemon.schema import Interaction
from learners.curation import Candidate, ContentIndex, Curator
from policies.curation import (SHINGLE_WORDS, CurationConfig, JunkLimits, content_key, flood, junk, loss_band, near_duplicate,
                               parse_decisions, quotas, shingles, text_stats, words)
from tests.test_registry import settings

TEXT = ("The consumer group is created from id 0 when it is absent, and an entry is acknowledged only when "
        "what it changed is on disk: learned into a checkpointed adapter, kept in the replay store, or "
        "dead-lettered with its reason. Entries left pending by a dead consumer are reclaimed, so when the "
        "group shows no lag and nothing pending, everything published has been handled.")
EDITED = TEXT.replace("absent", "missing")  # one word of sixty changed


# -- the decisions ----------------------------------------------------------------------------------------
def test_the_switch_reads_none_or_a_list_in_canonical_order():
    assert parse_decisions("none") == ()
    assert parse_decisions("junk, exact,near") == ("exact", "near", "junk")
    with pytest.raises(ValueError, match="magic"):
        parse_decisions("exact,magic")


def test_content_is_the_same_across_case_and_whitespace_but_not_across_words():
    assert content_key("Q:  two\tplus two?", " Four.") == content_key("q: two plus two?", "four.")
    assert content_key("Q: two plus two?", " Four.") != content_key("Q: two plus two?", " Five.")


@pytest.mark.parametrize("text", ["@@@@ ~~~~ @@@@ ~~~~ " * 3, "....", "|---|---|---|---|", "%$#@!*&^%$#@!a"])
def test_symbols_without_text_are_junk(text):
    assert junk(text_stats(text)).reason == "junk"


def test_a_loop_of_the_same_words_is_junk():
    assert "repeat" in junk(text_stats("buy now cheap pills " * 10)).detail


def test_markup_soup_and_bytes_read_as_text_are_junk():
    soup = '<div class="nav">&nbsp;</div><span style="x">&#8203;</span><a href="/x">&raquo;</a>' * 3
    assert "markup" in junk(text_stats(soup)).detail
    binary = TEXT + bytes(range(128, 160)).decode("utf-8", errors="replace") + "\x07\x1b" * 8  # mostly letters
    assert "replacement or control" in junk(text_stats(binary)).detail


@pytest.mark.parametrize("text", ["<U0041> <U0042>\n<U0043> <U0044>\n" * 4,  # a glibc locale table
                                  "<p>The <b>parser</b> reads the <a href='x'>file</a> and returns a tree.</p>"])
def test_symbolic_names_and_html_with_text_are_not_junk(text):
    assert junk(text_stats(text)) is None


@pytest.mark.parametrize("text", [" 4", " red.", TEXT, "    return x * 2 + len(str(x))\n", "日本語の文章です。",
                                  "def f(x):\n    if x:\n        return {'a': [1, 2]}\n    return None\n"])
def test_text_and_code_are_not_junk(text):
    assert junk(text_stats(text), JunkLimits()) is None


def test_near_duplicate_flood_and_loss_band_on_numbers():
    assert near_duplicate(0.85, 0.8).reason == "near_duplicate" and near_duplicate(0.79, 0.8) is None
    assert quotas(["a"] * 16 + ["b"] * 3 + ["c"], 0.5) == {"a": 10, "b": 3, "c": 1}
    assert quotas(["a"] * 20, 0.5) == {"a": 20}  # one source alone crowds nobody out
    assert flood("a", 10, 10, 0.5).reason == "flood" and flood("a", 9, 10, 0.5) is None
    assert loss_band(0.01, 0.05, 9.0).reason == "known" and loss_band(9.5, 0.05, 9.0).reason == "improbable"
    assert loss_band(2.0, 0.05, 9.0) is None and loss_band(float("nan"), 0.05, 9.0) is None


def test_short_texts_are_one_shingle():
    assert shingles("Hi", "") == [b"hi \x1f"] and shingles("Hi", " there.", n=3) == [b"hi \x1f there"]
    assert set(shingles("2+2=", " 4")) == {b"2 2", b"2 \x1f", b"\x1f 4"}
    assert len(shingles("", TEXT)) == len(words(TEXT))  # "\x1f" and the words, in word pairs


# -- the index ----------------------------------------------------------------------------------------------
def test_the_index_finds_near_duplicates_and_forgets_the_oldest(tmp_path):
    idx = ContentIndex(capacity=3)
    idx.add("h0", idx.minhash("", TEXT))
    assert idx.similarity(idx.minhash("", EDITED)) > 0.8
    assert idx.similarity(idx.minhash("", "An entirely different sentence about colours and weights.")) < 0.3
    for i in range(1, 4):
        idx.add(f"h{i}", idx.minhash("", f"filler text number {i} about something else entirely"))
    assert len(idx) == 3 and idx.n_exact == 3 and not idx.exact_seen("h0")
    assert idx.similarity(idx.minhash("", EDITED)) < 0.8  # evicted


def test_the_index_survives_a_round_trip_through_json_and_safetensors(tmp_path):
    idx = ContentIndex(capacity=100)
    for i in range(20):
        idx.add(f"h{i}", idx.minhash(f"Q{i}", f"{TEXT} Variant {i}." if i == 7 else f"answer {i} about item {i}"))
    (tmp_path / "curation.json").write_text(json.dumps(idx.save(tmp_path)))
    back = ContentIndex.load(tmp_path, 100, 128, 0.8)
    assert len(back) == 20 and back.exact_seen("h7")
    probe = back.minhash("Q7", f"{EDITED} Variant 7.")
    assert back.similarity(probe) == idx.similarity(probe) > 0.8
    # A smaller capacity keeps the newest; another num_perm or shingle size cannot compare: that half starts empty.
    assert len(ContentIndex.load(tmp_path, 5, 128, 0.8)) == 5
    other = ContentIndex.load(tmp_path, 100, 64, 0.8)
    assert len(other) == 0 and other.exact_seen("h7")
    other = ContentIndex.load(tmp_path, 100, 128, 0.8, shingle_words=SHINGLE_WORDS + 1)
    assert len(other) == 0 and other.exact_seen("h7")


# -- one window ---------------------------------------------------------------------------------------------
WORDS = ("owl lamp river stone cloud maple quartz violin harbor lemon tiger candle meadow copper "
         "pillow rocket garden falcon marble orbit velvet canyon pepper saddle").split()


def sentence(i: int) -> str:
    """Distinct text: eight words drawn for ``i``."""
    import random

    return " " + " ".join(random.Random(i).sample(WORDS, 8)) + "."


def cand(i: int, text: str, domain: str = "docs", reward: float = 1.0) -> Candidate:
    return Candidate(f"id{i}", f"Q{i}", text, reward, (("domain", domain),))


def test_a_window_skips_duplicates_junk_and_a_flood_and_keeps_the_rest():
    cur = Curator(CurationConfig(decisions=("exact", "near", "junk", "fair"), fair_share=0.5))
    first = cur.curate([cand(0, TEXT)])
    assert first == [None]
    window = ([Candidate("dup", "q0", " " + TEXT.upper(), 1.0, (("domain", "docs"),)),  # same content, another id
               Candidate("near", "Q0", EDITED, 1.0, (("domain", "docs"),)),
               cand(2, "@@@@ ~~~~ " * 4),
               cand(3, " negative example, pushed down " * 1, reward=-1.0),
               cand(4, " negative example, pushed down ", reward=-1.0)]  # not curated: reward <= 0
              + [cand(10 + i, sentence(i), "spam") for i in range(15)]
              + [cand(40 + i, f"a quiet source says thing {i}", "quiet") for i in range(3)])
    got = cur.curate(window)
    reasons = {c.id: (s.reason if s else None) for c, s in zip(window, got)}
    assert reasons["dup"] == "exact_duplicate" and reasons["near"] == "near_duplicate" and reasons["id2"] == "junk"
    assert reasons["id3"] is None and reasons["id4"] is None
    spam = [reasons[f"id{10 + i}"] for i in range(15)]
    # 21 curated (reward > 0) interactions in the window: spam may take 10 places (half of them, rounded down).
    assert spam.count(None) == 10 and set(spam) == {None, "flood"}
    assert all(reasons[f"id{40 + i}"] is None for i in range(3))


def test_curation_none_judges_nothing():
    cur = Curator(CurationConfig(decisions=()))
    assert cur.curate([cand(0, TEXT), cand(1, TEXT), cand(2, "@@@@")]) == [None] * 3


# -- the worker: durable skips, a restart, a crash before the acknowledgement -------------------------------
def items(texts: list[str], start: int = 0, domain: str = "d") -> list[Interaction]:
    return [Interaction(entry_id=f"{start + i + 1}-0", id=f"x{start + i}", prompt=f"Note {start + i}:", response=t,
                        meta={"domain": domain}) for i, t in enumerate(texts)]


def worker(tmp_path, tiny_model, **kw) -> LineageWorker:
    s = settings(tmp_path, tiny_model, heldout_fraction=0.0, **kw)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    return LineageWorker(s, "main")


def distinct(n: int) -> list[str]:
    return [f" fact {i}: the {['red', 'green', 'blue'][i % 3]} box holds {i * 3} marbles." for i in range(n)]


def test_the_worker_skips_with_reasons_durably_and_keeps_the_index_across_a_restart(tmp_path, tiny_model):
    w = worker(tmp_path, tiny_model)
    base = items(distinct(6) + [" " + TEXT])
    rep = w.learn(base)
    assert rep.learned == 7 and rep.skipped == []
    again = [Interaction(entry_id="100-0", id="copy", prompt="note 0:", response=base[0].response.upper()),
             Interaction(entry_id="101-0", id="junk", prompt="", response="~~~~ @@@@ " * 5),
             Interaction(entry_id="102-0", id="fresh", prompt="Note 99:", response=" a new fact about owls.")]
    rep = w.learn(again)
    assert {x["id"]: x["reason"] for x in rep.skipped} == {"copy": "exact_duplicate", "junk": "junk"}
    assert rep.learned == 1 and set(rep.ack) == {"100-0", "101-0", "102-0"}
    assert w.ledger.count("skipped") == 2 and w.counters["skipped"] == 2
    rec = {x["id"]: x for x in w.ledger.skipped()}["copy"]
    assert rec["entry_id"] == "100-0" and rec["response"] == again[0].response and rec["lineage"] == "main"
    w.close()

    # After a restart the near-duplicate index is the checkpoint's.
    w = LineageWorker(settings(tmp_path, tiny_model, heldout_fraction=0.0), "main")
    assert len(w.curator.index) == 8
    rep = w.learn([Interaction(entry_id="200-0", id="near", prompt="Note 6:", response=" " + EDITED)])
    assert [x["reason"] for x in rep.skipped] == ["near_duplicate"] and rep.learned == 0
    assert w.ledger.count("skipped") == 3


def test_a_skip_decided_before_a_crash_is_reported_again_on_redelivery(tmp_path, tiny_model):
    w = worker(tmp_path, tiny_model)
    w.learn(items(distinct(4)))
    window = [Interaction(entry_id="11-0", id="x10", prompt="Note 1:", response=distinct(4)[1])]  # another id
    rep = w.learn(window)  # durable; then the daemon dies before copying and acknowledging
    assert [x["reason"] for x in rep.skipped] == ["exact_duplicate"] and not rep.skipped[0]["again"]
    w.close()
    w = LineageWorker(settings(tmp_path, tiny_model, heldout_fraction=0.0), "main")
    rep = w.learn(window)  # the same entry, delivered again
    assert rep.duplicates == 1 and rep.learned == 0
    assert [(x["id"], x["reason"], x["again"]) for x in rep.skipped] == [("x10", "exact_duplicate", True)]
    # A producer re-sending the id (another entry) is a duplicate only.
    resent = [window[0].model_copy(update={"entry_id": "999-0"})]
    assert w.learn(resent).skipped == []


def test_curation_none_learns_everything_as_before(tmp_path, tiny_model):
    w = worker(tmp_path, tiny_model, curation="none")
    same = [Interaction(entry_id=f"{i + 1}-0", id=f"s{i}", prompt="Q", response=" answer.") for i in range(6)]
    rep = w.learn(same + items(["@@@@ ~~~~ " * 4], start=50))
    assert rep.learned == 7 and rep.skipped == [] and w.ledger.count("skipped") == 0


def test_a_window_that_fails_leaves_the_index_as_the_checkpoint_had_it(tmp_path, tiny_model, monkeypatch):
    w = worker(tmp_path, tiny_model)
    w.learn(items(distinct(3)))
    window = items(distinct(6)[3:], start=20)
    monkeypatch.setattr(w, "_learn_window", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        w.learn(window)
    monkeypatch.undo()
    rep = w.learn(window)  # the driver sends it again: nothing in it is a duplicate of itself
    assert rep.skipped == [] and rep.learned == 3
