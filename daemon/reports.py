"""What a learner returns to the driver after a learn window or a reduction.

They cross the Ray boundary, so they live apart from ``daemon.lineage``: unpickling a report imports
only this module, and the driver never loads torch to read one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from learners.timing import Timings
from policies.tuning import Change


@dataclass
class LearnReport:
    lineage: str
    ack: list[str]  # entry ids now safe to acknowledge
    learned: int = 0  # interactions learned into the live adapter (new ones and ``redeemed``)
    duplicates: int = 0
    heldout_added: int = 0
    steps: int = 0
    tokens: int = 0  # tokens through the optimizer (new and replayed rows, kept or rolled back)
    learned_tokens: int = 0  # tokens of the new interactions learned into the live adapter
    train_loss: float = float("nan")
    heldout: dict[str, float] = field(default_factory=dict)
    forgetting: float = 0.0
    rollback: str | None = None  # the reason of the window's first refusal (None: kept at the first try)
    rollbacks: list[str] = field(default_factory=list)  # the reason of every refused try (retries included)
    attempts: int = 0  # tries the gate judged (1 + retries under stronger protection)
    gate_items: int = 0  # held-out items the gate evaluated (before and after, every try)
    redeemed: int = 0  # of ``learned``: interactions an earlier window deferred
    deferred: int = 0  # new interactions kept to be tried again (too costly now)
    refused: list[dict] = field(default_factory=list)  # set aside: id, prompt, response, reward, domain, reason, detail
    replayed: int = 0  # deferred interactions pushed out of the bounded queue into the replay store
    # Skipped by curation (policies/curation.py), durable in the ledger: entry_id, id, prompt, response, reward,
    # meta, lineage, reason, detail, and "again" (True: an entry redelivered after a crash, decided before and
    # counted then; the driver copies it to <stream>:skipped again, which is why it is reported).
    skipped: list[dict] = field(default_factory=list)
    deferred_waiting: int = 0  # deferred interactions this lineage keeps to try again
    source_forgetting: dict[str, float] = field(default_factory=dict)  # per source: held-out loss above its best
    replay_items: int = 0
    update_seconds: float = 0.0
    # where update_seconds went: curate, gate_before, the step phases (step.batch, step.forward, step.teacher,
    # step.head_loss, step.backward, step.optimizer: learners.update.StepReport.seconds), replay (sampling),
    # gate_after (every try's held-out measurement), checkpoint; the rest is bookkeeping
    seconds: Timings = field(default_factory=Timings)
    reduce_due: bool = False
    window: int = 0  # new interactions the learner's next window wants (the driver sends at most that)
    phase: str = ""  # the phase the window was learned in
    knobs: dict[str, float] = field(default_factory=dict)  # learning rate, replay ratio, distillation weight
    tuning: list[Change] = field(default_factory=list)  # what the self-tuner changed after this window


@dataclass
class Snapshot:
    """A learner's model and data at one moment, on disk for the reducer (``daemon/snapshots.py``)."""
    lineage: str
    id: str
    path: str  # CASCADE_HOME/reductions/<lineage>/<id>
    parent: str  # the generation it was taken on
    trigger: str
    step: int  # the learner's checkpoint step at the snapshot
    n_params: int


@dataclass
class ReductionReport:
    lineage: str
    outcome: str  # "promoted", "rejected" or "failed"; from the reducer: "candidate" or "rejected"
    generation: str
    parent: str
    n_params_before: int
    n_params_after: int
    seconds: float
    card: dict | None = None
    detail: str = ""
    export_failures: list[str] = field(default_factory=list)  # one sentence per CASCADE_EXPORT target that failed
