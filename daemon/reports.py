"""What a learner returns to the driver after a learn window or a reduction.

They cross the Ray boundary, so they live apart from ``daemon.lineage``: unpickling a report imports
only this module, and the driver never loads torch to read one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from policies.tuning import Change


@dataclass
class LearnReport:
    lineage: str
    ack: list[str]  # entry ids now safe to acknowledge
    received: int = 0
    learned: int = 0
    duplicates: int = 0
    heldout_added: int = 0
    steps: int = 0
    tokens: int = 0  # tokens through the optimizer (new and replayed rows, kept or rolled back)
    learned_tokens: int = 0  # tokens of the new interactions learned into the live adapter
    train_loss: float = float("nan")
    heldout: dict[str, float] = field(default_factory=dict)
    forgetting: float = 0.0
    rollback: str | None = None
    rollback_detail: str = ""
    replay_items: int = 0
    update_seconds: float = 0.0
    reduce_due: bool = False
    phase: str = ""  # the phase the window was learned in
    knobs: dict[str, float] = field(default_factory=dict)  # learning rate, replay ratio, distillation weight
    tuning: list[Change] = field(default_factory=list)  # what the self-tuner changed after this window


@dataclass
class ReductionReport:
    lineage: str
    outcome: str  # "promoted", "rejected" or "failed"
    generation: str
    parent: str
    n_params_before: int
    n_params_after: int
    seconds: float
    card: dict | None = None
    detail: str = ""
    export_failures: list[str] = field(default_factory=list)  # one sentence per CASCADE_EXPORT target that failed
