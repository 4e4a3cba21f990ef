"""Self-tuning: the learning rate, the replay ratio and the distillation weight, adjusted inside
operator-set bounds from what the daemon measures, one update window at a time.

What it reads after each window (:class:`Signal`): the lineage's forgetting (mean held-out loss
above the best reached, over sources), whether the gate rolled the window back, and the training
loss on the window's rows. What it decides, first rule that fires:

1. **protect**: the window was rolled back, or forgetting (an exponential average over windows)
   is above ``forgetting_target``: learning rate x ``down``, replay ratio + ``replay_step``,
   distillation weight x ``up``;
2. **push**: forgetting below a quarter of the target, no rollback for ``patience`` windows, and
   the training loss no longer falling (less than 1% better over the last ``patience`` windows):
   learning rate x ``up``, replay ratio - ``replay_step`` / 2, distillation weight x ``down``.

After a change it waits ``cooldown`` windows, so the effect of one change is measured before the
next. Values are clamped to their bounds; a knob already at its bound is not "changed". Every
change comes back as a :class:`Change` with its reason, for the log and the metrics.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass


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
    forgetting: float
    rolled_back: bool
    train_loss: float


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
                 up: float = 1.25, replay_step: float = 0.1, patience: int = 6, cooldown: int = 4,
                 smoothing: float = 0.3) -> None:
        self.knobs = bounds.clamp(knobs)
        self.bounds = bounds
        self.target = forgetting_target
        self.down, self.up, self.replay_step = down, up, replay_step
        self.patience, self.cooldown, self.smoothing = patience, cooldown, smoothing
        self.forgetting = 0.0  # exponential average
        self.losses: collections.deque[float] = collections.deque(maxlen=patience)
        self.since_change = cooldown  # the first window may act
        self.since_rollback = patience

    def observe(self, s: Signal) -> list[Change]:
        """Take one window's signal; return the changes made to :attr:`knobs` (maybe none)."""
        if math.isfinite(s.forgetting):
            self.forgetting += self.smoothing * (s.forgetting - self.forgetting)
        if math.isfinite(s.train_loss) and not s.rolled_back:
            self.losses.append(s.train_loss)
        self.since_rollback = 0 if s.rolled_back else self.since_rollback + 1
        self.since_change += 1
        if self.since_change <= self.cooldown and not s.rolled_back:
            return []
        k = self.knobs
        if s.rolled_back or self.forgetting > self.target:
            why = ("the gate rolled the window back" if s.rolled_back else
                   f"forgetting {self.forgetting:.3f} above the target {self.target:.3f}")
            new = Knobs(k.learning_rate * self.down, k.replay_ratio + self.replay_step, k.distill_weight * self.up)
        elif (self.forgetting < self.target / 4 and self.since_rollback >= self.patience
              and len(self.losses) == self.patience and self.losses[-1] > 0.99 * self.losses[0]):
            why = (f"forgetting {self.forgetting:.3f} well under the target {self.target:.3f} and the training loss "
                   f"flat over {self.patience} windows ({self.losses[0]:.3f} -> {self.losses[-1]:.3f})")
            new = Knobs(k.learning_rate * self.up, k.replay_ratio - self.replay_step / 2, k.distill_weight * self.down)
        else:
            return []
        new = self.bounds.clamp(new)
        changes = [Change(name, getattr(k, name), getattr(new, name), why) for name in
                   ("learning_rate", "replay_ratio", "distill_weight")
                   if not math.isclose(getattr(k, name), getattr(new, name), rel_tol=1e-9)]
        if changes:
            self.knobs = new
            self.since_change = 0
            self.losses.clear()
        return changes
