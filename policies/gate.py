"""The held-out gate: keep an update window or roll it back.

Losses are mean next-token NLL (nats/token) per held-out source. An update window is rolled back
when, on any source:

* ``nonfinite``:  its loss is NaN or infinite;
* ``regression``: its loss rose by more than ``step_budget`` against the last accepted adapter;
* ``forgetting``: its loss is more than ``total_budget`` above the best this lineage ever reached
  on it *and* this window made it worse (so a lineage is never stuck: an update that helps or
  holds every source always passes).

A source seen for the first time has no reference and cannot fail the gate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GateDecision:
    accept: bool
    reason: str  # "ok", "no_heldout", "nonfinite", "regression" or "forgetting"
    detail: str = ""


def judge_update(before: dict[str, float], after: dict[str, float], best: dict[str, float],
                 step_budget: float = 0.05, total_budget: float = 0.15) -> GateDecision:
    if not after:
        return GateDecision(True, "no_heldout")
    for d, loss in after.items():
        if not math.isfinite(loss):
            return GateDecision(False, "nonfinite", f"held-out loss on {d!r} is {loss}")
    for d, loss in after.items():
        prev = before.get(d)
        if prev is not None and loss - prev > step_budget:
            return GateDecision(False, "regression",
                                f"held-out loss on {d!r} rose {loss - prev:.4f} > {step_budget}")
    for d, loss in after.items():
        prev, floor = before.get(d), best.get(d)
        if floor is not None and prev is not None and loss > floor + total_budget and loss > prev:
            return GateDecision(False, "forgetting",
                                f"held-out loss on {d!r} is {loss - floor:.4f} above its best")
    return GateDecision(True, "ok")


def forgetting(current: dict[str, float], best: dict[str, float]) -> float:
    """Mean over sources of how far the current held-out loss sits above the best reached (>= 0)."""
    gaps = [max(0.0, current[d] - best[d]) for d in current if d in best and math.isfinite(current[d])]
    return sum(gaps) / len(gaps) if gaps else 0.0
