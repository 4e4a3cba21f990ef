"""When a new adapter starts from a meta-learned initialization instead of the standard one.

A fresh adapter is made when a lineage is forked and after each promotion. With ``meta_init`` on,
:class:`MetaInitPolicy` looks at the replay data every lineage keeps (by source) and decides
whether there is enough of it to meta-learn from: at least ``min_tasks`` sources of at least
``min_items`` items each. Each fresh adapter gets an initialization meta-learned afresh on the data
kept at that moment (so it follows the traffic), capped at ``max_items`` per source so the cost
stays bounded. With too little data the standard LoRA initialization is used.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

from learners.data import Example


@dataclass(frozen=True)
class MetaInitPolicy:
    enabled: bool = False
    min_tasks: int = 2
    min_items: int = 8
    max_items: int = 256

    def tasks(self, items: Iterable[Example], seed: int = 0) -> dict[str, list[Example]] | None:
        """The tasks to meta-learn from (source -> examples), or None for the standard initialization."""
        if not self.enabled:
            return None
        by_source: dict[str, list[Example]] = {}
        for ex in items:
            if ex.reward > 0:
                by_source.setdefault(ex.domain, []).append(ex)
        rng = random.Random(seed)
        tasks = {d: rng.sample(v, min(len(v), self.max_items)) for d, v in sorted(by_source.items())
                 if len(v) >= self.min_items}
        return tasks if len(tasks) >= self.min_tasks else None
