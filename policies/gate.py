"""The held-out gate: what one update window gains and costs, and whether to keep it.

Numbers in, a decision out. For every held-out source the window is measured on the *same items*
before and after (:class:`Measured`): each item's summed NLL and token count. The change of a
source's loss is the paired difference ``delta`` (nats/token), and its ``noise`` the standard error
of that difference over the source's items: a source's held-out loss moves by chance, so a rise
counts only beyond ``z * noise`` (and ``min_effect``).

A window's verdict (:func:`judge_window`):

* ``harmful`` (set aside, never learned): a held-out loss is NaN or infinite; or one source rose
  by more than ``harm_budget`` in this one window. The worker retries the latter under stronger
  protection like a costly window, and sets the window aside only if its last try is still harmful.
* ``costly`` (retried under stronger protection, then deferred): a source that rose is now more
  than ``total_budget`` above its reference (the best this lineage reached on it): the bound on
  *cumulative* forgetting per source (``forgetting``); or the window made even the sources it
  brought worse (every arriving source the gate can judge rose: ``self_harm``, a step too large for
  what it learns). ``hurt`` names those sources, so a retry can replay them.
* ``ok`` (kept): anything else. A window may cost the sources the lineage keeps while it gains on
  the ones arriving, as long as each kept source stays within its bound: a new topic is not
  refused for moving an old one a little.

A source without a reference (seen for the first time) can only be harmed, never over its bound.

The gate need not measure every held-out item after every window: a source measured on a first share of its
items is :func:`settled` when even its change's upper bound (``delta + z * noise``) could not make it harmed,
over its bound or (an arriving source) risen; only an unsettled source is measured on the rest. Such a share
is judged with ``before_all``, the loss of all the source's items before the window, moved by the share's
paired change (a difference estimator), so that it compares with the source's reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


# Every reason a try can be refused for, and every reason interactions are set aside for (known in
# advance, so the metrics start them at 0).
REFUSAL_REASONS = ("nonfinite", "harm", "forgetting", "self_harm")
SET_ASIDE_REASONS = ("harmful", "unlearnable")
FATES = ("learned", "heldout", "deferred", "refused", "replayed", "duplicate")


@dataclass(frozen=True)
class Measured:
    """One source's held-out items, before and after a window: summed NLL and tokens per item. Where these
    are a share of the source's items, ``before_all`` is the loss of all of them before the window."""

    nll_before: tuple[float, ...]
    nll_after: tuple[float, ...]
    tokens: tuple[int, ...]
    before_all: float | None = None

    @property
    def before(self) -> float:
        if self.before_all is not None:
            return self.before_all
        return sum(self.nll_before) / max(1, sum(self.tokens))

    @property
    def after(self) -> float:
        return self.before + self.delta

    @property
    def delta(self) -> float:
        """Change of the loss (nats/token) on these items: positive is worse."""
        return (sum(self.nll_after) - sum(self.nll_before)) / max(1, sum(self.tokens))

    @property
    def noise(self) -> float:
        """Standard error of ``delta`` over items (the ratio estimator's, paired): 0 for one item."""
        k, n = len(self.tokens), sum(self.tokens)
        if k < 2 or n == 0:
            return 0.0
        d = self.delta
        resid = sum((a - b - d * t) ** 2 for a, b, t in zip(self.nll_after, self.nll_before, self.tokens))
        return math.sqrt(resid * k / (k - 1)) / n


@dataclass(frozen=True)
class GateDecision:
    accept: bool
    verdict: str  # "ok", "no_heldout", "costly" or "harmful"
    reason: str  # "ok", "no_heldout", "nonfinite", "harm", "self_harm" or "forgetting"
    detail: str = ""
    hurt: tuple[str, ...] = ()  # sources over their bound (costly) or harmed (harmful)
    deltas: dict[str, float] = field(default_factory=dict)


def judge_window(measured: dict[str, Measured], arriving: set[str], reference: dict[str, float], *,
                 total_budget: float = 0.15, harm_budget: float = 0.25, z: float = 2.0,
                 min_effect: float = 0.005) -> GateDecision:
    if not measured:
        return GateDecision(True, "no_heldout", "no_heldout")
    deltas = {d: m.delta for d, m in measured.items()}
    for d, m in measured.items():
        if not (math.isfinite(m.after) and math.isfinite(m.before)):
            return GateDecision(False, "harmful", "nonfinite", f"held-out loss on {d!r} is {m.after}", (d,), deltas)

    def significant(d: str) -> float:
        return max(z * measured[d].noise, min_effect)

    rose = [d for d in measured if deltas[d] > significant(d)]
    worst = max(rose, key=lambda d: deltas[d], default=None)
    if worst is not None and deltas[worst] > harm_budget:
        return GateDecision(False, "harmful", "harm", f"held-out loss on {worst!r} rose {deltas[worst]:.4f} in one "
                            f"window (> {harm_budget}, noise {measured[worst].noise:.4f})", (worst,), deltas)
    over = [d for d in rose if d in reference and measured[d].after - reference[d] > total_budget]
    if over:
        detail = "; ".join(f"{d!r} {measured[d].after - reference[d]:.4f} above its best (bound {total_budget}, "
                           f"this window {deltas[d]:+.4f} +- {measured[d].noise:.4f})" for d in over)
        return GateDecision(False, "costly", "forgetting", detail, tuple(sorted(over)), deltas)
    judged_arriving = arriving & set(measured)
    if judged_arriving and judged_arriving <= set(rose):
        return GateDecision(False, "costly", "self_harm",
                            f"the window raised the held-out loss of its own source(s) "
                            f"{', '.join(map(repr, sorted(judged_arriving)))}", tuple(sorted(rose)), deltas)
    return GateDecision(True, "ok", "ok", deltas=deltas)


def settled(m: Measured, reference: float | None, arriving: bool, *, total_budget: float = 0.15,
            harm_budget: float = 0.25, z: float = 2.0, min_effect: float = 0.005) -> bool:
    """Whether a source measured on a share of its items is decided: its change's upper bound ``delta + z *
    noise`` keeps it under the one-window ``harm_budget``, its estimated loss's upper bound within
    ``total_budget`` of its ``reference``, and (an arriving source, which :func:`judge_window` asks whether it
    rose) under ``min_effect``. The same keywords as :func:`judge_window`; two items at least (noise needs them)."""
    if len(m.tokens) < 2 or not all(math.isfinite(x) for x in (m.before, m.after, m.noise)):
        return False
    upper = m.delta + z * m.noise
    if upper > harm_budget or (arriving and upper > min_effect):
        return False
    return reference is None or m.after + z * m.noise - reference <= total_budget


def forgetting(current: dict[str, float], best: dict[str, float]) -> float:
    """Mean over sources of how far the current held-out loss sits above the best reached (>= 0)."""
    gaps = [max(0.0, current[d] - best[d]) for d in current if d in best and math.isfinite(current[d])]
    return sum(gaps) / len(gaps) if gaps else 0.0


@dataclass(frozen=True)
class Protection:
    """How a refused window is learned again: a lower rate, a stronger distillation term, and the
    replayed rows drawn from the sources it hurt. Level 0 is the window as configured."""

    level: int = 0
    lr_factor: float = 1.0
    distill_factor: float = 1.0
    prefer: tuple[str, ...] = ()


def stronger(p: Protection, hurt: tuple[str, ...], lr_step: float = 0.5, distill_step: float = 2.0) -> Protection:
    """The next level of protection after a refusal that hurt ``hurt``."""
    return Protection(p.level + 1, p.lr_factor * lr_step, p.distill_factor * distill_step,
                      tuple(sorted(set(p.prefer) | set(hurt))))
