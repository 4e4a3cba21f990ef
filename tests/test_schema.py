import json

import pytest

from daemon.schema import Interaction, Rejection, parse_entry


def parse(fields: dict, limit: int = 65536):
    enc = {(k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v) for k, v in fields.items()}
    return parse_entry("1-0", enc, limit)


def test_a_good_entry_with_defaults():
    it = parse({"prompt": "", "response": "hello"})
    assert isinstance(it, Interaction)
    assert (it.id, it.lineage, it.reward, it.meta, it.domain) == ("1-0", "main", 1.0, {}, "default")


def test_optional_fields():
    it = parse({"prompt": "p", "response": "r", "lineage": "law_2-b", "reward": "-0.5", "id": "abc",
                "meta": json.dumps({"domain": "law", "k": [1, 2]})})
    assert (it.lineage, it.reward, it.id, it.domain) == ("law_2-b", -0.5, "abc", "law")


@pytest.mark.parametrize("fields,reason", [
    ({"response": "r"}, "missing_field"),
    ({"prompt": "p"}, "missing_field"),
    ({"prompt": "p", "response": ""}, "empty_response"),
    ({"prompt": "p", "response": "\n\t "}, "empty_response"),
    ({"prompt": "p", "response": "r", "extra": "x"}, "unknown_field"),
    ({"prompt": b"\xc3\x28", "response": "r"}, "not_utf8"),
    ({b"\xff": "x", "prompt": "p", "response": "r"}, "not_utf8"),
    ({"prompt": "p", "response": "a\x00b"}, "bad_text"),
    ({"prompt": "p", "response": "r", "lineage": "../x"}, "bad_lineage"),
    ({"prompt": "p", "response": "r", "lineage": "Main"}, "bad_lineage"),
    ({"prompt": "p", "response": "r", "lineage": ""}, "bad_lineage"),
    ({"prompt": "p", "response": "r", "lineage": "a" * 65}, "bad_lineage"),
    ({"prompt": "p", "response": "r", "reward": "1.5"}, "bad_reward"),
    ({"prompt": "p", "response": "r", "reward": "nan"}, "bad_reward"),
    ({"prompt": "p", "response": "r", "reward": "inf"}, "bad_reward"),
    ({"prompt": "p", "response": "r", "reward": "good"}, "bad_reward"),
    ({"prompt": "p", "response": "r", "id": "x" * 129}, "bad_id"),
    ({"prompt": "p", "response": "r", "id": ""}, "bad_id"),
    ({"prompt": "p", "response": "r", "meta": "{not json"}, "bad_meta"),
    ({"prompt": "p", "response": "r", "meta": "[1]"}, "bad_meta"),
    ({"prompt": "p", "response": "r", "meta": json.dumps({"a": "x" * 5000})}, "bad_meta"),
    ({"prompt": "p", "response": "r", "meta": "[" * 2000 + "]" * 2000}, "bad_meta"),
    ({"prompt": "p", "response": "r", "meta": json.dumps({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {}}}}}}}}})}, "bad_meta"),
    ({"prompt": "p", "response": "x" * 70000}, "oversized"),
])
def test_bad_entries_are_rejected_with_a_reason(fields, reason):
    out = parse(fields)
    assert isinstance(out, Rejection), out
    assert out.reason == reason and out.detail and out.entry_id == "1-0"


def test_an_interaction_survives_the_trip_between_processes_unchanged():
    import pickle

    it = parse_entry("5-1", {b"prompt": b"Q", b"response": b" A", b"reward": b"-0.5", b"id": b"x",
                             b"meta": b'{"domain": "python", "n": [1, 2]}'}, 65536)
    back = pickle.loads(pickle.dumps(it))
    assert back == it and back.domain == "python" and back.reward == -0.5 and back.meta == {"domain": "python",
                                                                                              "n": [1, 2]}
