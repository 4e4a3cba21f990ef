"""What the gate measures: each held-out item's loss under the accepted adapter, and a window measured
on as few items as its verdict needs.

After a window, every source is measured on its first ``first_items`` items. A source that share
settles (:func:`policies.gate.settled`: even its change's upper bound leaves it unharmed, within its
bound and, arriving, not risen) is judged on the share alone; only an unsettled one is measured on the
rest of its items, paired with their losses before the window. So a window that moves nothing much costs
one batch per source instead of all its items, and a window that might cost something is judged on all
of them, as before.

Invariants:

* the first ``first_items`` cached losses of a source are the accepted adapter's (they are measured after
  every window and kept when it is accepted, and a new item is measured before it is paired); the others
  may be older (``stale``: measured under an
  earlier accepted adapter), and are measured again under the accepted weights (``measure_accepted``)
  before they are paired with a window's;
* a source's ``level`` (its loss over all its items under the accepted adapter) is ``exact`` when every
  item was measured under that adapter, and otherwise the last exact level moved by the shares' paired
  changes since (a difference estimator); it is made exact again at least every ``exact_every``
  accepted windows (the rest measured after the window, no pairing needed), so estimates never drift far.

``first_items=0`` measures every item after every window (each level exact).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from learners.data import Example
from policies.gate import Measured, settled

# A model's summed NLL and tokens per example (learners.update.item_losses bound to a model).
Measure = Callable[[Sequence[Example]], tuple[list[float], list[int]]]


@dataclass
class SourceLosses:
    """One source's items under the accepted adapter (``stale`` ones under an earlier one)."""

    nll: list[float]
    tokens: list[int]
    level: float
    exact: bool = True
    stale: set[int] = field(default_factory=set)
    since_exact: int = 0  # accepted windows since ``level`` was exact

    @classmethod
    def measured(cls, nll: list[float], tokens: list[int]) -> "SourceLosses":
        return cls(list(nll), list(tokens), sum(nll) / max(1, sum(tokens)))


@dataclass
class Pending:
    """A source's losses after a window, kept only if the window is accepted."""

    nll: list[float]
    level: float
    exact: bool
    stale: set[int]


class HeldoutLosses:
    def __init__(self, first_items: int, exact_every: int) -> None:
        """``first_items``, ``exact_every``: CASCADE_GATE_FIRST_ITEMS and CASCADE_GATE_EXACT_EVERY."""
        self.first_items = first_items
        self.exact_every = exact_every
        self.sources: dict[str, SourceLosses] = {}
        self._unmeasured: dict[str, set[int]] = {}  # items replaced or added since they were measured
        self.items_measured = 0  # held-out items evaluated so far (what the gate cost)

    def changed(self, source: str, index: int) -> None:
        """Item ``index`` of ``source`` is new (appended or replaced)."""
        self._unmeasured.setdefault(source, set()).add(index)

    def _run(self, measure: Measure, items: Sequence[Example]) -> tuple[list[float], list[int]]:
        self.items_measured += len(items)
        return measure(items) if items else ([], [])

    def refresh(self, sets: dict[str, list[Example]], measure: Measure) -> set[str]:
        """Measure, under the accepted adapter now in place, what a window must be paired with: a new
        source whole, and a changed one's new items only. Returns the sources whose level was
        (re)computed. A changed source's stale items stay stale: its level is estimated with them moved
        by the per-token drift its level implies (what the difference estimator says they moved by)."""
        done = set()
        for d in [d for d in self.sources if d not in sets]:
            del self.sources[d]
        for d, v in sets.items():
            src, new = self.sources.get(d), self._unmeasured.pop(d, set())
            if src is None or len(src.nll) > len(v):
                self.sources[d] = SourceLosses.measured(*self._run(measure, v))
            elif new or len(src.nll) < len(v):
                stale_tokens = sum(src.tokens[i] for i in src.stale)
                drift = ((src.level * sum(src.tokens) - sum(src.nll)) / stale_tokens) if stale_tokens else 0.0
                todo = sorted(new | set(range(len(src.nll), len(v))))
                nll, tokens = self._run(measure, [v[i] for i in todo])
                src.nll += [0.0] * (len(v) - len(src.nll))
                src.tokens += [0] * (len(v) - len(src.tokens))
                for i, n, t in zip(todo, nll, tokens):
                    src.nll[i], src.tokens[i] = n, t
                src.stale -= set(todo)
                moved = drift * sum(src.tokens[i] for i in src.stale)
                src.level = (sum(src.nll) + moved) / max(1, sum(src.tokens))
                src.exact = not src.stale
            else:
                continue
            done.add(d)
        return done

    def measure_window(self, sets: dict[str, list[Example]], measure: Measure, measure_accepted: Measure,
                       judged: set[str], arriving: set[str], reference: dict[str, float],
                       **budgets: float) -> tuple[dict[str, Measured], dict[str, Pending]]:
        """The window's measurement of every judged source (for :func:`policies.gate.judge_window`) and
        every source's losses to keep if it is accepted. ``budgets``: judge_window's keywords."""
        measured, pending = {}, {}
        for d, v in sets.items():
            src, n = self.sources[d], len(v)
            k = n if self.first_items <= 0 else min(n, self.first_items)
            head, tokens = self._run(measure, v[:k])
            share = Measured(tuple(src.nll[:k]), tuple(head), tuple(tokens[:k]),
                             before_all=None if k == n else src.level)
            if k == n:
                measured[d], pending[d] = share, Pending(head, share.after, True, set())
            elif d not in judged or settled(share, reference.get(d), d in arriving, **budgets):
                measured[d] = share
                if src.since_exact + 1 < self.exact_every:
                    pending[d] = Pending(head + src.nll[k:], share.after, False, src.stale | set(range(k, n)))
                else:  # due: the rest measured after the window, every item the accepted adapter's again
                    rest, _ = self._run(measure, v[k:])
                    pending[d] = Pending(head + rest, (sum(head) + sum(rest)) / max(1, sum(src.tokens)), True, set())
            else:  # unsettled: judged on every item, paired
                if src.stale:
                    todo = sorted(src.stale)
                    again, _ = self._run(measure_accepted, [v[i] for i in todo])
                    for i, x in zip(todo, again):
                        src.nll[i] = x
                    src.stale, src.exact, src.since_exact = set(), True, 0  # the accepted adapter, measured whole
                    src.level = sum(src.nll) / max(1, sum(src.tokens))
                rest, _ = self._run(measure, v[k:])
                full = Measured(tuple(src.nll), tuple(head + rest), tuple(src.tokens))
                measured[d], pending[d] = full, Pending(head + rest, full.after, True, set())
        return {d: m for d, m in measured.items() if d in judged}, pending

    def accept(self, pending: dict[str, Pending]) -> dict[str, float]:
        """Keep an accepted window's losses; returns each source's level (exact or estimated)."""
        for d, p in pending.items():
            src = self.sources[d]
            src.nll, src.level, src.exact, src.stale = p.nll, p.level, p.exact, p.stale
            src.since_exact = 0 if p.exact else src.since_exact + 1
        return {d: p.level for d, p in pending.items()}
