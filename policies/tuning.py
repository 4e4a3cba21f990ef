"""Self-tuning: the learning rate, the replay ratio and the distillation weight, adjusted inside
operator-set bounds from what the daemon measures, one update window at a time.

What it reads after each window (:class:`Signal`): the lineage's forgetting (mean held-out loss
above the best reached, over sources), whether the gate rolled the window back, and the held-out
loss of each source the window learned (the *arriving* sources). What it decides, first rule that
fires:

1. **protect** at once: the window was rolled back: learning rate x ``down``, replay ratio +
   ``replay_step``, distillation weight x ``up``;
2. **restore**: a source arrives that no window of the last ``patience`` learned (the traffic
   shifted): the learning rate goes back to the operator's, so that the new source is learned at the
   rate it was set for, whatever an earlier source's annealing left;
3. **protect** (after the cooldown): forgetting (an exponential average over windows) is above
   ``forgetting_target``: the same changes as 1;
4. **anneal** (after the cooldown): no arriving source's held-out loss has improved on its best by ``min_gain`` nats for
   ``patience`` windows: the sources arriving are learned as far as this rate takes them, and more
   steps at it would spend what the lineage keeps for nothing: learning rate x ``down`` (a plateau
   schedule, judged on held-out loss of the newest traffic rather than on the training loss, which
   keeps falling as the adapter memorizes).

It never raises the learning rate above the operator's. (An earlier rule did, when the training
loss went flat with forgetting low; it measured worse than no tuning on every count of the
continual benchmark, docs/bench-continual.md.) After a change it waits ``cooldown`` windows, so the
effect of one change is measured before the next; a rollback and a shift act at once. Values are
clamped to their bounds; a knob already at its bound is not "changed". Every change comes back as a
:class:`Change` with its reason, for the log and the metrics.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Knobs:
    learning_rate: float
    replay_ratio: float
    distill_weight: float


@dataclass(frozen=True)
class Bounds:
    learning_rate: tuple[float, float]
    replay_ratio: tuple[float, float]
    distill_weight: tuple[float, float]

    def clamp(self, knobs: Knobs) -> Knobs:
        return Knobs(*(min(hi, max(lo, getattr(knobs, k))) for k, (lo, hi) in
                       (("learning_rate", self.learning_rate), ("replay_ratio", self.replay_ratio),
                        ("distill_weight", self.distill_weight))))


@dataclass(frozen=True)
class Signal:
    forgetting: float  # mean held-out loss above the best reached, over sources (nats)
    rolled_back: bool
    arriving: dict[str, float] = field(default_factory=dict)  # source learned -> its held-out loss (NaN: none)


@dataclass(frozen=True)
class Change:
    knob: str
    old: float
    new: float
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.new > self.old else "down"


class SelfTuner:
    def __init__(self, knobs: Knobs, bounds: Bounds, forgetting_target: float = 0.05, *, down: float = 0.7,
                 up: float = 1.25, replay_step: float = 0.1, min_gain: float = 0.01, patience: int = 4,
                 cooldown: int = 2, smoothing: float = 0.3) -> None:
        self.operator = bounds.clamp(knobs)  # the values set: the learning rate a shift restores
        self.knobs = self.operator
        self.bounds = bounds
        self.target = forgetting_target
        self.down, self.up, self.replay_step, self.min_gain = down, up, replay_step, min_gain
        self.patience, self.cooldown, self.smoothing = patience, cooldown, smoothing
        self.forgetting = 0.0  # exponential average
        self.recent: collections.deque[frozenset[str]] = collections.deque(maxlen=patience)  # sources per window
        self.best: dict[str, float] = {}  # each arriving source's best held-out loss since it arrived
        self.stale = 0  # windows since an arriving source last improved by min_gain
        self.since_change = cooldown  # the first window may act

    def observe(self, s: Signal) -> list[Change]:
        """Take one window's signal; return the changes made to :attr:`knobs` (maybe none)."""
        if math.isfinite(s.forgetting):
            self.forgetting += self.smoothing * (s.forgetting - self.forgetting)
        new = [d for d in s.arriving if self.recent and not any(d in w for w in self.recent)]
        self.recent.append(frozenset(s.arriving))
        improved = False
        for d, loss in s.arriving.items():
            if d in new:
                self.best.pop(d, None)
            if not math.isfinite(loss):
                continue
            improved = improved or loss < self.best.get(d, math.inf) - self.min_gain
            self.best[d] = min(loss, self.best.get(d, math.inf))
        if improved or new:
            self.stale = 0
        elif any(math.isfinite(v) for v in s.arriving.values()):  # no held-out level: no evidence of a plateau
            self.stale += 1
        self.since_change += 1
        k = self.knobs
        protect = Knobs(k.learning_rate * self.down, k.replay_ratio + self.replay_step, k.distill_weight * self.up)
        if s.rolled_back:
            return self._set(protect, "the gate rolled the window back")
        if new:  # the rate only ever falls from the operator's, so restoring it is setting it
            return self._set(Knobs(self.operator.learning_rate, k.replay_ratio, k.distill_weight),
                             f"a new source arrived ({', '.join(sorted(new))})")
        if self.since_change <= self.cooldown:
            return []
        if self.forgetting > self.target:
            return self._set(protect, f"forgetting {self.forgetting:.3f} above the target {self.target:.3f}")
        if self.stale >= self.patience:
            return self._set(Knobs(k.learning_rate * self.down, k.replay_ratio, k.distill_weight),
                             f"no arriving source's held-out loss improved by {self.min_gain:g} in "
                             f"{self.stale} windows")
        return []

    def _set(self, new: Knobs, why: str) -> list[Change]:
        k, new = self.knobs, self.bounds.clamp(new)
        changes = [Change(name, getattr(k, name), getattr(new, name), why) for name in
                   ("learning_rate", "replay_ratio", "distill_weight")
                   if not math.isclose(getattr(k, name), getattr(new, name), rel_tol=1e-9)]
        if changes:
            self.knobs = new
            self.since_change = 0
            self.stale = 0
        return changes
