"""Hostile input: a catalogue of bad stream entries with the exact dead-letter reason of each, fuzzing of
``parse_entry`` with hypothesis, and the catalogue published to a running daemon between good entries."""
from __future__ import annotations

import json
import math
import random
import re
import sqlite3
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.registry import LINEAGE_RE
from daemon.schema import MAX_ID_CHARS, REASONS, Interaction, Rejection, parse_entry
from daemon.stream import DEAD_FIELDS
from tests.conftest import metric_value, settings_env, wait_drained
from tests.redis_servers import RedisServer, needs_redis_server
from tests.test_daemon_e2e import GROUP, STREAM, interaction

LIMIT = 65536
OK = {"prompt": "p", "response": "r"}


def nested(depth: int) -> str:
    """A JSON object ``depth`` objects deep."""
    return '{"a":' * (depth - 1) + "{}" + "}" * (depth - 1)


# (name, fields, reason): every kind of bad entry and the reason it is dead-lettered with.
CATALOGUE: list[tuple[str, dict, str]] = [
    # size
    ("huge-response", {"prompt": "p", "response": "x" * 70_000}, "oversized"),
    ("huge-prompt", {"prompt": "p" * 65_600, "response": "r"}, "oversized"),
    ("huge-field-name", {**OK, "k" * 70_000: "v"}, "oversized"),
    ("many-fields", {**OK, **{f"f{i:05d}": "v" * 40 for i in range(2000)}}, "oversized"),
    # encoding
    ("invalid-utf8-value", {"prompt": "p", "response": b"\xff\xfe not utf-8"}, "not_utf8"),
    ("invalid-utf8-key", {**OK, b"\xc3\x28": "v"}, "not_utf8"),
    ("overlong-utf8-slash", {"prompt": b"\xc0\xaf", "response": "r"}, "not_utf8"),
    ("utf8-encoded-surrogate", {"prompt": "p", "response": b"\xed\xa0\x80"}, "not_utf8"),
    ("truncated-utf8", {"prompt": "p", "response": "snow\u2603".encode()[:-1]}, "not_utf8"),
    ("binary-junk", {"prompt": "p", "response": bytes(random.Random(6).randrange(128, 256) for _ in range(512))},
     "not_utf8"),
    ("png-header", {"prompt": "p", "response": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff"}, "not_utf8"),
    # fields
    ("missing-response", {"prompt": "no response here"}, "missing_field"),
    ("missing-prompt", {"response": "r"}, "missing_field"),
    ("only-optional-fields", {"lineage": "main", "reward": "1"}, "missing_field"),
    ("extra-field", {**OK, "extra": "x"}, "unknown_field"),
    ("field-name-case", {"Prompt": "p", "response": "r"}, "unknown_field"),
    ("field-name-space", {**OK, "reward ": "1"}, "unknown_field"),
    ("forged-reason-field", {**OK, "reason": "ok", "source_id": "0-1"}, "unknown_field"),
    # text
    ("empty-response", {"prompt": "p", "response": ""}, "empty_response"),
    ("whitespace-response", {"prompt": "p", "response": " \n\t\u3000 "}, "empty_response"),
    ("nul-in-response", {"prompt": "p", "response": "a\x00b"}, "bad_text"),
    ("nul-in-prompt", {"prompt": "\x00", "response": "r"}, "bad_text"),
    # lineage
    ("lineage-dotdot", {**OK, "lineage": "../x"}, "bad_lineage"),
    ("lineage-slash", {**OK, "lineage": "a/b"}, "bad_lineage"),
    ("lineage-trailing-newline", {**OK, "lineage": "x\n"}, "bad_lineage"),
    ("lineage-dot", {**OK, "lineage": "."}, "bad_lineage"),
    ("lineage-absolute", {**OK, "lineage": "/etc"}, "bad_lineage"),
    ("lineage-empty", {**OK, "lineage": ""}, "bad_lineage"),
    ("lineage-uppercase", {**OK, "lineage": "Main"}, "bad_lineage"),
    ("lineage-leading-dash", {**OK, "lineage": "-rf"}, "bad_lineage"),
    ("lineage-too-long", {**OK, "lineage": "a" * 65}, "bad_lineage"),
    ("lineage-lookalike", {**OK, "lineage": "ma\u0131n"}, "bad_lineage"),
    ("lineage-nul", {**OK, "lineage": "ma\x00in"}, "bad_lineage"),
    ("lineage-backslash", {**OK, "lineage": "a\\b"}, "bad_lineage"),
    # reward
    ("reward-above-range", {**OK, "reward": "1.5"}, "bad_reward"),
    ("reward-below-range", {**OK, "reward": "-1.0001"}, "bad_reward"),
    ("reward-nan", {**OK, "reward": "nan"}, "bad_reward"),
    ("reward-inf", {**OK, "reward": "inf"}, "bad_reward"),
    ("reward-minus-inf", {**OK, "reward": "-inf"}, "bad_reward"),
    ("reward-overflow", {**OK, "reward": "1e309"}, "bad_reward"),
    ("reward-word", {**OK, "reward": "good"}, "bad_reward"),
    ("reward-empty", {**OK, "reward": ""}, "bad_reward"),
    ("reward-underscore", {**OK, "reward": "0_5"}, "bad_reward"),
    ("reward-arabic-digits", {**OK, "reward": "\u0660.\u0665"}, "bad_reward"),
    ("reward-hex", {**OK, "reward": "0x1"}, "bad_reward"),
    ("reward-padded", {**OK, "reward": " 0.5"}, "bad_reward"),
    ("reward-json", {**OK, "reward": '{"v": 1}'}, "bad_reward"),
    # id
    ("id-too-long", {**OK, "id": "x" * (MAX_ID_CHARS + 1)}, "bad_id"),
    ("id-empty", {**OK, "id": ""}, "bad_id"),
    ("id-nul", {**OK, "id": "a\x00"}, "bad_id"),
    # meta
    ("meta-not-json", {**OK, "meta": "{not json"}, "bad_meta"),
    ("meta-array", {**OK, "meta": "[1, 2]"}, "bad_meta"),
    ("meta-string", {**OK, "meta": '"domain"'}, "bad_meta"),
    ("meta-null", {**OK, "meta": "null"}, "bad_meta"),
    ("meta-nan", {**OK, "meta": '{"a": NaN}'}, "bad_meta"),
    ("meta-infinity", {**OK, "meta": '{"a": -Infinity}'}, "bad_meta"),
    ("meta-oversized", {**OK, "meta": json.dumps({"a": "x" * 5000})}, "bad_meta"),
    ("meta-nested-9", {**OK, "meta": nested(9)}, "bad_meta"),
    ("meta-nested-600", {**OK, "meta": nested(600)}, "bad_meta"),
    ("meta-nested-arrays-2000", {**OK, "meta": "[" * 2000 + "]" * 2000}, "bad_meta"),
    ("meta-python-literal", {**OK, "meta": "{'a': 1}"}, "bad_meta"),
    ("meta-code", {**OK, "meta": "__import__('os').system('true')"}, "bad_meta"),
]


def encode(fields: dict) -> dict[bytes, bytes]:
    return {(k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
            for k, v in fields.items()}


def test_the_catalogue_covers_every_reason_with_many_kinds():
    assert len(CATALOGUE) >= 30 and len({name for name, _, _ in CATALOGUE}) == len(CATALOGUE)
    assert {reason for _, _, reason in CATALOGUE} == REASONS


@pytest.mark.parametrize("fields,reason", [pytest.param(f, r, id=n) for n, f, r in CATALOGUE])
def test_each_hostile_entry_is_rejected_with_its_exact_reason(fields, reason):
    out = parse_entry("7-0", encode(fields), LIMIT)
    assert isinstance(out, Rejection), out
    assert (out.entry_id, out.reason) == ("7-0", reason), out.detail
    assert out.detail and "\n" not in out.detail and len(out.detail) < 300


# Odd but legitimate input, and how it is handled (kept verbatim; never executed).
ACCEPTED: list[tuple[str, dict, dict]] = [
    ("control-characters-kept", {"prompt": "\x1b[31mred\x1b[0m\r\x07", "response": "tab\there\x7f"},
     {"prompt": "\x1b[31mred\x1b[0m\r\x07", "response": "tab\there\x7f"}),
    ("bidi-override-kept", {"prompt": "\u202egnp.exe", "response": "ok"}, {"prompt": "\u202egnp.exe"}),
    ("empty-prompt", {"prompt": "", "response": "r"}, {"prompt": ""}),
    ("reward-edges", {**OK, "reward": "-1"}, {"reward": -1.0}),
    ("reward-exponent", {**OK, "reward": "5e-1"}, {"reward": 0.5}),
    ("reward-zero", {**OK, "reward": "+0.0"}, {"reward": 0.0}),
    ("id-at-limit", {**OK, "id": "i" * MAX_ID_CHARS}, {"id": "i" * MAX_ID_CHARS}),
    ("id-path-like", {**OK, "id": "../../etc/passwd"}, {"id": "../../etc/passwd"}),
    ("meta-nested-8", {**OK, "meta": nested(8)}, {}),
    ("meta-domain-truncated", {**OK, "meta": json.dumps({"domain": "d" * 500})}, {"domain": "d" * 64}),
    ("meta-domain-not-text", {**OK, "meta": '{"domain": 5}'}, {"domain": "default"}),
    ("response-just-under-limit", {"prompt": "", "response": "y" * (LIMIT - 20)}, {}),
]


@pytest.mark.parametrize("fields,expected", [pytest.param(f, e, id=n) for n, f, e in ACCEPTED])
def test_odd_but_legitimate_entries_are_accepted_verbatim(fields, expected):
    out = parse_entry("7-0", encode(fields), LIMIT)
    assert isinstance(out, Interaction), out
    for key, value in expected.items():
        assert getattr(out, key) == value


# -- fuzzing ----------------------------------------------------------------------------------------
# Any code point, lone surrogates included, with the characters parse_entry cares about made frequent.
ANY_TEXT = st.text(st.one_of(st.characters(codec=None, exclude_categories=()),
                             st.sampled_from("\x00\n\t .-/_\\\u0131\u202e\ud800\udfffaZ09")), max_size=80)
FIELD_NAMES = st.sampled_from([b"prompt", b"response", b"lineage", b"reward", b"id", b"meta"])
RAW_VALUE = st.one_of(st.binary(max_size=120), ANY_TEXT.map(lambda s: s.encode("utf-8", "surrogatepass")))
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                          lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4), max_leaves=30)
FIELD_VALUES = {
    b"prompt": ANY_TEXT,
    b"response": ANY_TEXT,
    b"lineage": st.one_of(st.from_regex(LINEAGE_RE), st.sampled_from(["main", "../x", "a/b", "x\n", ""]), ANY_TEXT),
    b"reward": st.one_of(st.floats().map(repr), st.floats(-1, 1).map(str), st.integers().map(str), ANY_TEXT),
    b"id": ANY_TEXT,
    b"meta": st.one_of(JSON_VALUE.map(lambda v: json.dumps(v)), ANY_TEXT,
                       st.integers(1, 1200).map(lambda n: "[" * n + "]" * n)),
}
FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def check_outcome(fields: dict[bytes, bytes], limit: int) -> Interaction | Rejection:
    out = parse_entry("5-0", fields, limit)
    if isinstance(out, Rejection):
        assert out.reason in REASONS and out.detail and out.entry_id == "5-0"
        return out
    assert isinstance(out, Interaction)
    assert sum(len(k) + len(v) for k, v in fields.items()) <= limit
    assert LINEAGE_RE.fullmatch(out.lineage)
    assert math.isfinite(out.reward) and -1.0 <= out.reward <= 1.0
    assert 1 <= len(out.id) <= MAX_ID_CHARS and "\x00" not in out.id
    assert out.response.strip() and "\x00" not in out.response + out.prompt
    assert isinstance(out.meta, dict)
    json.dumps(out.meta, allow_nan=False)  # strict JSON, so it is stored and re-read as such
    out.model_dump_json()
    return out


@FUZZ
@given(st.dictionaries(st.one_of(FIELD_NAMES, st.binary(max_size=10)), RAW_VALUE, max_size=8),
       st.integers(256, LIMIT))
def test_fuzz_arbitrary_fields_never_raise(fields, limit):
    check_outcome(fields, limit)


@st.composite
def entries(draw) -> dict[bytes, bytes]:
    fields = {b"prompt": draw(FIELD_VALUES[b"prompt"]), b"response": draw(FIELD_VALUES[b"response"])}
    for name in (b"lineage", b"reward", b"id", b"meta"):
        if draw(st.booleans()):
            fields[name] = draw(FIELD_VALUES[name])
    raw = {k: v.encode("utf-8", "surrogatepass") for k, v in fields.items()}
    for name in raw:  # now and then a value that is not UTF-8 at all
        if draw(st.integers(0, 15)) == 0:
            raw[name] = draw(st.binary(min_size=1, max_size=40))
    return raw


@FUZZ
@given(entries())
def test_fuzz_entries_with_the_right_fields_are_valid_or_rejected_with_a_known_reason(fields):
    out = check_outcome(fields, LIMIT)
    if isinstance(out, Interaction):  # text is kept verbatim
        assert out.prompt.encode() == fields[b"prompt"] and out.response.encode() == fields[b"response"]


# -- through the daemon -----------------------------------------------------------------------------
HOSTILE_CONTROLS = [{"command": "reduce", "lineage": "../x"}, {"command": "reduce", "lineage": "x\n"},
                    {"command": "fork", "from": "../x/gen-0000", "to": "y"},
                    {"command": "fork", "from": "main/gen-0000", "to": "../x"},
                    {"command": "fork", "from": "main/gen-0000\n", "to": "y"},
                    {"command": "rm -rf /"}, {"command": b"\xff\xfe"}, {"lineage": "main"}]


def health(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return r.status


@needs_redis_server
def test_hostile_entries_and_commands_are_dead_lettered_or_ignored_and_the_good_ones_learned(tmp_path, tiny_model,
                                                                                      daemon_factory):
    n_good, resent = 48, [3, 17, 17]
    with RedisServer(tmp_path / "redis") as server:
        home = tmp_path / "home"
        d = daemon_factory(settings_env(home, tiny_model, server.url))
        d.wait_healthy()
        r = server.client()
        expected: dict[str, str] = {}
        originals: dict[str, dict[bytes, bytes]] = {}
        bad = [(f, reason) for _, f, reason in CATALOGUE] + [({**interaction(0), "lineage": "ghost"}, "unknown_lineage")]
        good = iter(range(n_good))
        for fields, reason in bad:  # each bad entry between two good ones
            for i in (next(good, None), next(good, None)):
                if i is not None:
                    r.xadd(STREAM, {**interaction(i), "id": f"good-{i}"})
            eid = r.xadd(STREAM, encode(fields)).decode()
            expected[eid], originals[eid] = reason, encode(fields)
        for i in good:
            r.xadd(STREAM, {**interaction(i), "id": f"good-{i}"})
        for i in resent:  # a producer retrying: learned at most once, counted as duplicates
            r.xadd(STREAM, {**interaction(i), "id": f"good-{i}"})
        for command in HOSTILE_CONTROLS:
            r.xadd("cascade:control", encode(command))
        wait_drained(r, STREAM, GROUP, proc=d)
        wait_drained(r, "cascade:control", GROUP, proc=d)

        dead = {e[1][b"source_id"].decode(): e[1] for e in r.xrange(f"{STREAM}:dead")}
        assert {eid: f[b"reason"].decode() for eid, f in dead.items()} == expected
        for eid, fields in dead.items():
            assert fields[b"detail"]
            if expected[eid] != "unknown_lineage":  # the original fields travel with the dead letter
                for k, v in originals[eid].items():
                    key = b"orig_" + k if k.decode("utf-8", "replace") in DEAD_FIELDS else k
                    assert fields[key] == v

        state = json.loads((home / "registry/main/live/state.json").read_text())
        heldout = sum(len(v) for v in json.loads((home / "registry/main/live/heldout.json").read_text()).values())
        assert state["interactions_learned"] + heldout == n_good
        ids = sqlite3.connect(home / "registry/main/ledger.sqlite").execute("SELECT id FROM seen").fetchall()
        assert sorted(i for (i,) in ids) == sorted(f"good-{i}" for i in range(n_good))
        assert sorted(p.name for p in (home / "registry").iterdir()) == ["main"]

        m = d.metrics()
        assert metric_value(m, "cascade_interactions_rejected_total") == len(bad)
        for reason in REASONS:
            assert metric_value(m, "cascade_interactions_rejected_total", reason=reason) == \
                sum(1 for _, want in bad if want == reason)
        assert metric_value(m, "cascade_interactions_duplicate_total", lineage="main") == len(resent)
        refused = re.findall(r"WARNING cascade\.daemon: control: (?:.* ignored|fork failed)", d.log.read_text())
        assert len(refused) == len(HOSTILE_CONTROLS)
        assert d.proc.poll() is None and health(d.port) == 200
        assert d.terminate() == 0
