"""Curation: what in a window of traffic is worth learning. Numbers (and a little text) in, a reason out.

Production traffic is not refined: the same answer templated a thousand times, near-duplicates, junk,
one source flooding the rest. Before a window is learned, every interaction is judged by the
decisions switched on in ``CASCADE_CURATION`` (:data:`DECISIONS`); the first that objects names the
reason it is skipped (:data:`REASONS`), and ``None`` means it is learned as before.

* ``exact`` — the same content (prompt and response after :func:`normalise`) was learned recently:
  ``exact_duplicate``. The ``id`` rule catches a producer re-sending; this catches two producers, or
  one template, sending the same thing under different ids.
* ``near`` — a MinHash estimate of the Jaccard similarity of word 3-gram shingles (:func:`shingles`)
  to recently learned content reaches ``threshold``: ``near_duplicate`` (the index is
  ``learners.curation.ContentIndex``; here only the verdict on the measured similarity).
* ``junk`` — the response is not text worth imitating (:func:`junk`): hardly a letter or digit in
  it, the same words over and over, bytes that were not text (replacement and control characters),
  or markup with hardly any text between the tags.
* ``fair`` — one source (``meta.domain``, and ``meta.producer`` where a producer names itself) takes
  more than ``share`` of a window that other sources share too: ``flood`` (:func:`quotas`).
* ``loss`` — the live model's loss on the response (nats/token) is outside a band: below ``low`` it
  is already known (or boilerplate): ``known``; above ``high`` it is noise to this model: ``improbable``.

Only interactions to be learned towards (reward > 0) are curated: a negative reward pushes its
response down, and de-duplicating or filtering that signal would weaken it.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

DECISIONS = ("exact", "near", "junk", "fair", "loss")
# Conservative until bench/curation measures the others: nothing here skips text that is new.
DEFAULT_DECISIONS = ("exact", "near", "junk")
REASONS = ("exact_duplicate", "near_duplicate", "junk", "flood", "known", "improbable")
SHINGLE_WORDS = 2  # word pairs: bench/curation_threshold --shingles (2 beat 1, 3 and 4 on both counts)
WORD_RE = re.compile(r"\w+")
SPACE_RE = re.compile(r"\s+")
ALNUM_RE = re.compile(r"[^\W_]+")  # letters and digits, any script
# Markup: closing tags, tags with attributes and character entities (a bare <NAME> is not counted: glibc
# locale files, for one, write every character as <U0041>).
MARKUP_RE = re.compile(r"</[A-Za-z][\w:.-]*\s*>|<[A-Za-z][\w:.-]*(?:\s+[\w:.-]+(?:\s*=\s*(?:\"[^\"<>]*\"|'[^'<>]*'"
                       r"|[^\s<>'\"]+))?)+\s*/?>|&#?\w{1,10};")
UNDECODABLE_RE = re.compile(r"[\ufffd\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]+")  # U+FFFD, control characters


@dataclass(frozen=True)
class Skip:
    """Why an interaction is not learned: a reason code (:data:`REASONS`) and one human sentence."""

    reason: str
    detail: str


def parse_decisions(text: str) -> tuple[str, ...]:
    """``CASCADE_CURATION``: ``none``, or a comma list of :data:`DECISIONS` (in their canonical order)."""
    items = [x.strip().lower() for x in text.split(",") if x.strip()]
    if items == ["none"]:
        return ()
    unknown = [x for x in items if x not in DECISIONS]
    if unknown or not items:
        raise ValueError(f"unknown curation decision(s) {unknown or text!r}; use 'none' or a comma list of "
                         f"{', '.join(DECISIONS)}")
    return tuple(d for d in DECISIONS if d in items)


# -- measuring text -------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    """What two texts must share to be the same content: NFKC, case-folded, whitespace collapsed."""
    return SPACE_RE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def content_key(prompt: str, response: str) -> str:
    return normalise(prompt) + "\x1f" + normalise(response)


def words(text: str) -> list[str]:
    return WORD_RE.findall(normalise(text))


def shingles(prompt: str, response: str, n: int = SHINGLE_WORDS) -> list[bytes]:
    """Word ``n``-grams of the interaction (prompt, a separator, response); a text of fewer words is one
    shingle, so two short texts are near-duplicates only when their words are the same."""
    w = words(prompt) + ["\x1f"] + words(response)
    if len(w) <= n:
        return [" ".join(w).encode()]
    return sorted({" ".join(w[i : i + n]).encode() for i in range(len(w) - n + 1)})


@dataclass(frozen=True)
class TextStats:
    chars: int  # characters that are not whitespace
    alnum_share: float  # of those, letters and digits (any script: str.isalnum)
    n_words: int
    repetition: float  # 1 - distinct word 3-grams / word 3-grams (0: none repeats; near 1: a loop)
    markup_share: float  # of the visible characters, those in tags (<...>) and entities (&...;)
    undecodable_share: float  # of the visible characters, U+FFFD and control characters (bytes read as text)


def text_stats(text: str) -> TextStats:
    visible = len(text) - sum(map(len, SPACE_RE.findall(text)))
    alnum = sum(map(len, ALNUM_RE.findall(text)))  # regular expressions: ~10x a loop over characters
    markup = sum(len(SPACE_RE.sub("", m.group())) for m in MARKUP_RE.finditer(text))
    undecodable = sum(map(len, UNDECODABLE_RE.findall(text)))
    w = words(text)
    grams = list(zip(w, w[1:], w[2:]))
    repetition = 1.0 - len(set(grams)) / len(grams) if grams else 0.0
    alnum_s, markup_s, undecodable_s = (n / visible if visible else 0.0 for n in (alnum, markup, undecodable))
    return TextStats(visible, alnum_s, len(w), repetition, markup_s, undecodable_s)


# -- the decisions --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JunkLimits:
    min_alnum_share: float = 0.25  # a response this many chars or longer needs this share of letters/digits
    min_chars: int = 8
    max_repetition: float = 0.75  # share of repeated word 3-grams, judged from ``min_words`` words
    min_words: int = 16
    max_markup_share: float = 0.8  # tags and entities with hardly any text between them
    max_undecodable_share: float = 0.05  # text this full of U+FFFD or control characters was not text


@dataclass(frozen=True)
class CurationConfig:
    """A lineage's curation: which decisions run, and their numbers (the defaults of the CASCADE_CURATION_*
    settings, written once here)."""
    decisions: tuple[str, ...] = DEFAULT_DECISIONS
    capacity: int = 10_000  # exact hashes and MinHashes kept per lineage (each)
    num_perm: int = 128  # MinHash permutations
    threshold: float = 0.75  # estimated Jaccard similarity at which content is a near-duplicate (bench/curation_threshold)
    shingle_words: int = SHINGLE_WORDS  # words per shingle of the near-duplicate MinHash
    fair_share: float = 0.5  # largest share of a window one source may take while others share it
    loss_low: float = 0.05  # nats/token under which a response is already known
    loss_high: float = 9.0  # nats/token over which a response is noise to the model
    junk: JunkLimits = field(default_factory=JunkLimits)


def junk(stats: TextStats, limits: JunkLimits = JunkLimits()) -> Skip | None:
    if stats.chars and stats.alnum_share == 0:
        return Skip("junk", "the response has no letter or digit")
    if stats.chars >= limits.min_chars and stats.alnum_share < limits.min_alnum_share:
        return Skip("junk", f"{stats.alnum_share:.0%} of the response is letters or digits "
                            f"(under {limits.min_alnum_share:.0%})")
    if stats.n_words >= limits.min_words and stats.repetition > limits.max_repetition:
        return Skip("junk", f"{stats.repetition:.0%} of the response's word 3-grams repeat "
                            f"(over {limits.max_repetition:.0%})")
    if stats.chars >= limits.min_chars and stats.undecodable_share > limits.max_undecodable_share:
        return Skip("junk", f"{stats.undecodable_share:.0%} of the response is replacement or control characters "
                            f"(over {limits.max_undecodable_share:.0%}: bytes that were not text)")
    if stats.chars >= limits.min_chars and stats.markup_share > limits.max_markup_share:
        return Skip("junk", f"{stats.markup_share:.0%} of the response is markup tags or entities "
                            f"(over {limits.max_markup_share:.0%})")
    return None


def exact_duplicate(seen: bool) -> Skip | None:
    return Skip("exact_duplicate", "the same prompt and response were learned recently") if seen else None


def near_duplicate(similarity: float, threshold: float) -> Skip | None:
    """``similarity``: the highest estimated Jaccard similarity to recent content (0 when none is close)."""
    if similarity >= threshold:
        return Skip("near_duplicate", f"{similarity:.2f} similar to recently learned content "
                                      f"(threshold {threshold:.2f})")
    return None


def quotas(sources: list[str], share: float) -> dict[str, int]:
    """Places each source may take in a window of ``sources`` (one entry per interaction): at most
    ``share`` of the window (at least one place) while other sources share it; a window of one source
    crowds nobody out, so it is not capped."""
    counts = Counter(sources)
    if len(counts) < 2:
        return {s: n for s, n in counts.items()}
    cap = max(1, math.floor(share * len(sources)))
    return {s: min(n, cap) for s, n in counts.items()}


def flood(source: str, taken: int, quota: int, share: float) -> Skip | None:
    if taken >= quota:
        return Skip("flood", f"source {source!r} is over its share of this window ({share:.0%})")
    return None


def loss_band(loss: float, low: float, high: float) -> Skip | None:
    """``loss``: the live model's mean NLL of the response, nats/token."""
    if not math.isfinite(loss):
        return None  # nothing measured (no response tokens): not a reason to skip
    if loss < low:
        return Skip("known", f"the model already predicts the response ({loss:.3f} nats/token < {low})")
    if loss > high:
        return Skip("improbable", f"the response is noise to the model ({loss:.2f} nats/token > {high})")
    return None
