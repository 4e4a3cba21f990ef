"""A bounded replay store that keeps every source of the stream represented.

Plain reservoir sampling over a stream drifting across domains lets the newest domain crowd out
the old ones in proportion to its volume. ``ReplayBuffer`` keeps one reservoir per source
(``Example.domain``) and splits the capacity evenly between the sources seen so far, so an old
domain keeps its share however long the stream stays on a new one. Within a source, reservoir
sampling keeps a uniform sample of everything that source ever sent.

The store is bounded in items (``capacity``) and in UTF-8 bytes (``max_bytes``), and round-trips
through plain JSON (:meth:`to_json` / :meth:`from_json`), so it persists without pickling.

Beside each item the store keeps the best :class:`Prediction` the lineage made on it: the model's
likeliest next tokens at the item's response positions, taken when the item was replayed and kept
while it is the lowest-loss one seen (so it records what that source's rows were learned to).
Distillation pulls toward it (``learners/update.py``), as dark experience replay does with stored
logits. Predictions belong to one generation (:attr:`generation`) and persist as safetensors
(:meth:`save_predictions` / :meth:`load_predictions`): ``capacity`` x response tokens x
``k`` x 6 bytes at most (2,000 items of 200 tokens at k=8: 19 MB).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from learners.data import Example


@dataclass(frozen=True)
class Prediction:
    """The model's ``k`` likeliest tokens at each of a row's loss-carrying positions and their
    log-probabilities, and the row's mean loss (nats/token) when they were taken."""
    tokens: torch.Tensor  # [N, k] int32
    logp: torch.Tensor  # [N, k] float16
    nll: float


def _size(ex: Example) -> int:
    return len(ex.prompt.encode()) + len(ex.response.encode()) + 64


class ReplayBuffer:
    def __init__(self, capacity: int, max_bytes: int = 64 << 20, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._rng = random.Random(seed)
        self._items: dict[str, list[Example]] = {}
        self._seen: dict[str, int] = {}
        self._bytes = 0
        self._predictions: dict[str, Prediction] = {}
        self.generation = ""  # the generation the predictions were made on

    def __len__(self) -> int:
        return sum(len(v) for v in self._items.values())

    @property
    def nbytes(self) -> int:
        return self._bytes

    def domains(self) -> dict[str, int]:
        """Items kept per source."""
        return {d: len(v) for d, v in self._items.items()}

    def _quota(self) -> int:
        return max(1, self.capacity // max(1, len(self._items)))

    def add(self, ex: Example) -> None:
        if self.capacity == 0:
            return
        d = ex.domain
        if d not in self._items:
            self._items[d] = []
            self._seen[d] = 0
            self._shrink_to_quota()
        self._seen[d] += 1
        bucket = self._items[d]
        if len(bucket) < self._quota():
            bucket.append(ex)
            self._bytes += _size(ex)
        else:
            j = self._rng.randrange(self._seen[d])
            if j < len(bucket):
                self._bytes += _size(ex) - _size(bucket[j])
                self._predictions.pop(bucket[j].id, None)
                bucket[j] = ex
        self._enforce_bytes()

    def extend(self, examples: Sequence[Example]) -> None:
        for ex in examples:
            self.add(ex)

    def _drop_random(self, d: str) -> None:
        bucket = self._items[d]
        ex = bucket.pop(self._rng.randrange(len(bucket)))
        self._bytes -= _size(ex)
        self._predictions.pop(ex.id, None)

    def _shrink_to_quota(self) -> None:
        q = self._quota()
        for d, bucket in self._items.items():
            while len(bucket) > q:
                self._drop_random(d)

    def _enforce_bytes(self) -> None:
        while self._bytes > self.max_bytes and len(self):
            largest = max(self._items, key=lambda d: len(self._items[d]))
            self._drop_random(largest)

    def sample(self, n: int, prefer: Sequence[str] = ()) -> list[Example]:
        """``n`` items (fewer if the store is smaller): a source drawn uniformly, then an item of it.
        With ``prefer``, sources are drawn from those of them the store holds (a retry replays the
        sources a refused window hurt), falling back to every source when it holds none of them."""
        live = [d for d, v in self._items.items() if v and d in prefer] or [d for d, v in self._items.items() if v]
        if not live or n <= 0:
            return []
        available = sum(len(self._items[d]) for d in live)
        n = min(n, available)
        taken: set[tuple[str, int]] = set()
        out: list[Example] = []
        while len(out) < n:
            d = self._rng.choice(live)
            i = self._rng.randrange(len(self._items[d]))
            if (d, i) in taken:
                if len(taken) >= available:
                    break
                continue
            taken.add((d, i))
            out.append(self._items[d][i])
        return out

    def all(self) -> list[Example]:
        return [ex for v in self._items.values() for ex in v]

    # -- predictions -----------------------------------------------------------------------------
    def prediction(self, ex: Example) -> Prediction | None:
        return self._predictions.get(ex.id)

    def remember(self, predictions: Mapping[str, Prediction], generation: str) -> int:
        """Keep each of ``predictions`` whose item is stored and whose loss is lower than the one kept
        (all of them for another generation's store); returns how many were kept."""
        if generation != self.generation:
            self._predictions, self.generation = {}, generation
        stored = {ex.id for ex in self.all()}
        kept = 0
        for i, p in predictions.items():
            old = self._predictions.get(i)
            if i in stored and (old is None or p.nll < old.nll):
                self._predictions[i] = p
                kept += 1
        return kept

    def save_predictions(self, path: str | Path) -> None:
        kept = list(self._predictions.items())
        tensors = {"tokens": torch.zeros(0, 1, dtype=torch.int32), "logp": torch.zeros(0, 1, dtype=torch.float16)}
        if kept:
            tensors = {"tokens": torch.cat([p.tokens for _, p in kept]), "logp": torch.cat([p.logp for _, p in kept])}
        rows = [[i, len(p.tokens), p.nll] for i, p in kept]
        save_file(tensors, str(path), metadata={"generation": self.generation, "rows": json.dumps(rows)})

    def load_predictions(self, path: str | Path, generation: str) -> None:
        """The predictions saved at ``path`` if they were made on ``generation`` (else none)."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        self._predictions, self.generation = {}, generation
        if meta.get("generation") != generation:
            return
        t = load_file(str(path))
        stored = {ex.id for ex in self.all()}
        at = 0
        for i, n, nll in json.loads(meta.get("rows", "[]")):
            if i in stored:
                self._predictions[i] = Prediction(t["tokens"][at : at + n], t["logp"][at : at + n], float(nll))
            at += n

    def to_json(self) -> dict:
        state = self._rng.getstate()
        return {
            "capacity": self.capacity,
            "max_bytes": self.max_bytes,
            "seen": self._seen,
            "items": {d: [ex.to_json() for ex in v] for d, v in self._items.items()},
            "rng": [state[0], list(state[1]), state[2]],
        }

    @classmethod
    def from_json(cls, d: dict, capacity: int | None = None, max_bytes: int | None = None) -> "ReplayBuffer":
        buf = cls(capacity if capacity is not None else int(d["capacity"]),
                  max_bytes if max_bytes is not None else int(d["max_bytes"]))
        buf._seen = {k: int(v) for k, v in d["seen"].items()}
        for dom, items in d["items"].items():
            buf._items[dom] = [Example.from_json(x) for x in items]
            buf._bytes += sum(_size(x) for x in buf._items[dom])
        rng = d.get("rng")
        if rng:
            buf._rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        buf._shrink_to_quota()
        buf._enforce_bytes()
        return buf


class DeferredQueue:
    """Interactions a window could not learn within the forgetting bound, kept to be tried again.

    Bounded in items; each item remembers how many windows it was tried in. :meth:`take` hands out
    the oldest items for the next window; :meth:`put_back` returns those the window did not learn,
    one try older, and gives back the ones that have used up ``max_tries`` (the caller refuses them)
    and those pushed out by the bound (the caller keeps them in the replay store). JSON round-trip.
    """

    def __init__(self, capacity: int, max_tries: int) -> None:
        self.capacity = capacity
        self.max_tries = max_tries
        self._items: list[tuple[Example, int]] = []

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return [ex.id for ex, _ in self._items]

    def take(self, n: int) -> list[tuple[Example, int]]:
        taken, self._items = self._items[:n], self._items[n:]
        return taken

    def put_back(self, items: Sequence[tuple[Example, int]]) -> tuple[list[Example], list[Example]]:
        """Queue ``items`` (example, tries so far) again after one more try: ``(exhausted, overflow)``."""
        exhausted = [ex for ex, tries in items if tries + 1 >= self.max_tries]
        self._items += [(ex, tries + 1) for ex, tries in items if tries + 1 < self.max_tries]
        overflow = [ex for ex, _ in self._items[: max(0, len(self._items) - self.capacity)]]
        self._items = self._items[len(overflow):]
        return exhausted, overflow

    def to_json(self) -> list[dict]:
        return [{**ex.to_json(), "tries": tries} for ex, tries in self._items]

    @classmethod
    def from_json(cls, items: list[dict], capacity: int, max_tries: int) -> "DeferredQueue":
        q = cls(capacity, max_tries)
        q._items = [(Example.from_json(d), int(d.get("tries", 0))) for d in items][-capacity:] if capacity else []
        return q
