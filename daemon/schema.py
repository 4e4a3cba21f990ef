"""What a stream entry must look like, and the reasons one is dead-lettered.

``parse_entry`` turns the raw fields of one ``XREADGROUP`` entry into an :class:`Interaction`, or
into a :class:`Rejection` with a short ``reason`` code and a one-sentence ``detail``. It never
raises on bad input.

Reason codes: ``oversized``, ``not_utf8``, ``missing_field``, ``unknown_field``, ``empty_response``,
``bad_text``, ``bad_lineage``, ``bad_reward``, ``bad_id``, ``bad_meta`` (:data:`REASONS`).

Text may hold any Unicode character but NUL (tabs, newlines, escape sequences are kept verbatim:
the text is only ever tokenized). A reward is a plain ASCII decimal number, so ``float``'s other
spellings (``1_0``, non-ASCII digits, ``nan``) are refused; ``meta`` must be strict JSON (no
``NaN``/``Infinity``).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from pydantic import BaseModel, Field

from daemon.registry import LINEAGE_RE

if TYPE_CHECKING:
    from learners.data import Example

KNOWN_FIELDS = {"prompt", "response", "lineage", "reward", "id", "meta"}
MAX_META_BYTES = 4096
MAX_META_DEPTH = 8
MAX_ID_CHARS = 128
REASONS = frozenset({"oversized", "not_utf8", "missing_field", "unknown_field", "empty_response", "bad_text",
                     "bad_lineage", "bad_reward", "bad_id", "bad_meta"})
SURROGATE_RE = re.compile("[\ud800-\udfff]")
REWARD_RE = re.compile(r"\A[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\Z")


class Interaction(BaseModel):
    """A validated interaction, as it travels from the stream to a learner."""

    entry_id: str
    id: str = Field(max_length=MAX_ID_CHARS)
    prompt: str
    response: str = Field(min_length=1)
    lineage: str = "main"
    reward: float = Field(1.0, ge=-1.0, le=1.0)
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def domain(self) -> str:
        d = self.meta.get("domain")
        return d[:64] if isinstance(d, str) and d else "default"

    def example(self) -> Example:
        from learners.data import Example  # torch: only the learner needs it

        return Example(id=self.id, prompt=self.prompt, response=self.response, reward=self.reward,
                       domain=self.domain)

    def __reduce__(self):
        # Between the daemon's own processes (Ray) an interaction travels as a tuple of its fields:
        # pydantic's default pickling cost ~140 us an entry, the ingest path's largest cost
        # (bench/throughput.py, ingest); validating again on arrival costs ~2 us, less than
        # ``model_construct`` (~3 us).
        return (_rebuild_interaction, (self.entry_id, self.id, self.prompt, self.response, self.lineage,
                                       self.reward, self.meta))


def _rebuild_interaction(entry_id: str, id: str, prompt: str, response: str, lineage: str, reward: float,
                         meta: dict) -> Interaction:
    return Interaction(entry_id=entry_id, id=id, prompt=prompt, response=response, lineage=lineage,
                       reward=reward, meta=meta)


@dataclass(frozen=True)
class Rejection:
    entry_id: str
    reason: str
    detail: str


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether the JSON ``value`` nests objects/arrays more than ``limit`` levels deep.

    Iterative, so a hostile ``meta`` nested hundreds of levels cannot exhaust the Python stack."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (v.values() if isinstance(v, dict) else v))
    return False


def _bad_text(s: str) -> str | None:
    if "\x00" in s:
        return "contains a NUL character"
    if SURROGATE_RE.search(s):
        return "contains a lone surrogate"
    return None


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def parse_entry(entry_id: str, fields: dict[bytes, bytes], max_entry_bytes: int) -> Interaction | Rejection:
    def reject(reason: str, detail: str) -> Rejection:
        return Rejection(entry_id, reason, detail)

    size = sum(len(k) + len(v) for k, v in fields.items())
    if size > max_entry_bytes:
        return reject("oversized", f"entry is {size} bytes, over the {max_entry_bytes}-byte limit")
    text: dict[str, str] = {}
    for k, v in fields.items():
        try:
            key = k.decode("utf-8")
            text[key] = v.decode("utf-8")
        except UnicodeDecodeError:
            return reject("not_utf8", f"field {k[:40]!r} is not valid UTF-8")
    unknown = sorted(set(text) - KNOWN_FIELDS)
    if unknown:
        return reject("unknown_field", f"unknown field(s) {', '.join(repr(u[:40]) for u in unknown[:5])}")
    for name in ("prompt", "response"):
        if name not in text:
            return reject("missing_field", f"required field {name!r} is missing")
    if not text["response"].strip():
        return reject("empty_response", "field 'response' is empty")
    for name in ("prompt", "response"):
        bad = _bad_text(text[name])
        if bad:
            return reject("bad_text", f"field {name!r} {bad}")

    lineage = text.get("lineage", "main")
    if not LINEAGE_RE.match(lineage):
        return reject("bad_lineage", f"lineage {lineage[:70]!r} does not match [a-z0-9][a-z0-9_-]{{0,63}}")

    reward = 1.0
    if "reward" in text:
        if not REWARD_RE.match(text["reward"]):
            return reject("bad_reward", f"reward {text['reward'][:40]!r} is not a decimal number")
        reward = float(text["reward"])
        if not math.isfinite(reward) or not -1.0 <= reward <= 1.0:
            return reject("bad_reward", f"reward {reward} is outside [-1, 1]")

    ident = text.get("id", entry_id)
    if not ident or len(ident) > MAX_ID_CHARS or _bad_text(ident):
        return reject("bad_id", f"id must be 1 to {MAX_ID_CHARS} characters of text")

    meta: dict = {}
    if "meta" in text:
        raw = text["meta"]
        if len(raw.encode()) > MAX_META_BYTES:
            return reject("bad_meta", f"meta is over {MAX_META_BYTES} bytes")
        try:
            meta = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            return reject("bad_meta", "meta is not valid JSON")
        if not isinstance(meta, dict):
            return reject("bad_meta", "meta must be a JSON object")
        if _deeper_than(meta, MAX_META_DEPTH):
            return reject("bad_meta", f"meta is nested deeper than {MAX_META_DEPTH} levels")

    return Interaction(entry_id=entry_id, id=ident, prompt=text["prompt"], response=text["response"],
                       lineage=lineage, reward=reward, meta=meta)
