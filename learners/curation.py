"""A lineage's curation state and the curation of one window (the decisions are ``policies.curation``'s).

``ContentIndex`` remembers the content a lineage learned recently: a bounded set of exact content
hashes and a MinHash LSH index (``datasketch``) over the word shingles of the same items, each
holding at most ``capacity`` entries, the oldest evicted first. It persists as plain JSON (hashes,
keys, order) plus one safetensors tensor of MinHash values (``curation.safetensors``, uint32
``[n, num_perm]``), never pickle, and the LSH index is rebuilt from them on load. The lineage worker
writes both into every checkpoint beside ``replay.json``, so the index is durable exactly when the
ledger's outcomes are.

Why here, in ``learners/``: it is learning state (what the adapter has seen) with no Ray, no Redis
and no torch (numpy and datasketch only), and it runs in a unit test in milliseconds.

``Curator.curate`` judges one window: for each interaction the first decision that objects names
its :class:`policies.curation.Skip`; what is learned is added to the index as it is judged, so a
second copy inside the same window is a duplicate of the first.
"""
from __future__ import annotations

import collections
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from datasketch import MinHash, MinHashLSH

from policies.curation import (SHINGLE_WORDS, CurationConfig, JunkLimits, Skip, content_key, exact_duplicate, flood,
                               junk, loss_band, near_duplicate, quotas, shingles, text_stats)

log = logging.getLogger("cascade.curation")
SCHEME = "affine32"  # datasketch's 32-bit scheme: values fit uint32, halving what is stored
SEED = 1
LSH_WEIGHTS = (0.1, 0.9)  # datasketch's weights of false positives and false negatives in choosing bands
TENSOR = "minhash"


@dataclass(frozen=True)
class Candidate:
    """One interaction as curation sees it. ``sources``: (kind, name) pairs the fairness rule bounds,
    e.g. ``(("domain", "docs"), ("producer", "crawler-2"))``."""

    id: str
    prompt: str
    response: str
    reward: float = 1.0
    sources: tuple[tuple[str, str], ...] = ()
    exempt: bool = False  # learned whatever curation would decide (an operator's replay: meta.curation "off")


def content_hash(prompt: str, response: str) -> str:
    return hashlib.blake2b(content_key(prompt, response).encode(), digest_size=12).hexdigest()


class ContentIndex:
    def __init__(self, capacity: int, num_perm: int = 128, threshold: float = 0.8,
                 shingle_words: int = SHINGLE_WORDS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity, self.num_perm, self.threshold = capacity, num_perm, threshold
        self.shingle_words = shingle_words
        self.permutations = MinHash(num_perm=num_perm, seed=SEED, scheme=SCHEME).permutations
        self._exact: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._near: collections.OrderedDict[str, MinHash] = collections.OrderedDict()
        # LSH only proposes candidates (the MinHash estimate decides), so its bands favour recall: at the
        # default weights it proposed 40% of the pairs at similarity 0.8 and 69% at 0.85; at these, 87%
        # and 97%, for 13% of the pairs at 0.6 proposed and then rejected by the estimate.
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        self._next = 0  # keys of the LSH index: a counter, so every insertion is a new key

    def __len__(self) -> int:
        return len(self._near)

    @property
    def n_exact(self) -> int:
        return len(self._exact)

    def minhash(self, prompt: str, response: str) -> MinHash:
        m = MinHash(num_perm=self.num_perm, seed=SEED, permutations=self.permutations, scheme=SCHEME)
        m.update_batch(shingles(prompt, response, self.shingle_words))
        return m

    def exact_seen(self, digest: str) -> bool:
        return digest in self._exact

    def similarity(self, m: MinHash) -> float:
        """The highest estimated Jaccard similarity of ``m`` to the content kept (0.0 when LSH finds no
        candidate): LSH proposes, the MinHash estimate decides."""
        best = 0.0
        for key in self._lsh.query(m):
            best = max(best, m.jaccard(self._near[key]))
        return best

    def add(self, digest: str, m: MinHash | None) -> None:
        self._exact[digest] = None
        self._exact.move_to_end(digest)
        while len(self._exact) > self.capacity:
            self._exact.popitem(last=False)
        if m is None:
            return
        key = str(self._next)
        self._next += 1
        self._lsh.insert(key, m, check_duplication=False)
        self._near[key] = m
        while len(self._near) > self.capacity:
            old, _ = self._near.popitem(last=False)
            self._lsh.remove(old)

    # -- persistence: JSON + one safetensors tensor -------------------------------------------------
    def to_json(self) -> dict:
        return {"capacity": self.capacity, "num_perm": self.num_perm, "threshold": self.threshold,
                "shingle_words": self.shingle_words, "scheme": SCHEME, "next": self._next,
                "exact": list(self._exact), "near": list(self._near)}

    def tensors(self) -> dict[str, np.ndarray]:
        rows = [m.hashvalues.astype(np.uint32) for m in self._near.values()]
        matrix = np.stack(rows) if rows else np.zeros((0, self.num_perm), dtype=np.uint32)
        return {TENSOR: np.ascontiguousarray(matrix)}

    def save(self, directory: Path) -> dict:
        """Write ``curation.safetensors`` into ``directory`` (a checkpoint not yet published); returns the
        JSON half for the caller to write beside it (``curation.json``)."""
        from safetensors.numpy import save_file

        save_file(self.tensors(), str(Path(directory) / "curation.safetensors"))
        return self.to_json()

    @classmethod
    def load(cls, directory: Path, capacity: int, num_perm: int, threshold: float,
             shingle_words: int = SHINGLE_WORDS) -> "ContentIndex":
        """The index a checkpoint holds (an empty one where it holds none). Hashes made with another
        ``num_perm`` or shingle size cannot be compared with new ones: that half starts empty, the exact
        half is kept."""
        import json

        from safetensors.numpy import load_file

        idx = cls(capacity, num_perm, threshold, shingle_words)
        meta_path, tensor_path = Path(directory) / "curation.json", Path(directory) / "curation.safetensors"
        if not meta_path.is_file():
            return idx
        d = json.loads(meta_path.read_text(encoding="utf-8"))
        for digest in d.get("exact", [])[-capacity:]:
            idx._exact[str(digest)] = None
        idx._next = int(d.get("next", 0))
        keys = [str(k) for k in d.get("near", [])]
        made = (int(d.get("num_perm", num_perm)), int(d.get("shingle_words", SHINGLE_WORDS)), d.get("scheme"))
        if made != (num_perm, shingle_words, SCHEME):
            log.warning("curation index in %s was made with num_perm=%s, shingles of %s words: its near-duplicate "
                        "half starts empty", directory, made[0], made[1])
            return idx
        if keys and tensor_path.is_file():
            matrix = load_file(str(tensor_path))[TENSOR]
            if matrix.shape != (len(keys), num_perm):
                raise ValueError(f"{tensor_path}: {matrix.shape} does not match {len(keys)} keys x {num_perm}")
            for key, row in list(zip(keys, matrix))[-capacity:]:
                m = MinHash(num_perm=num_perm, seed=SEED, hashvalues=row, permutations=idx.permutations,
                            scheme=SCHEME)
                idx._lsh.insert(key, m, check_duplication=False)
                idx._near[key] = m
        return idx


class Curator:
    def __init__(self, config: CurationConfig, index: ContentIndex | None = None) -> None:
        self.cfg = config
        self.index = index or ContentIndex(config.capacity, config.num_perm, config.threshold, config.shingle_words)

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.decisions)

    def curate(self, items: Sequence[Candidate], losses: Sequence[float] | None = None) -> list[Skip | None]:
        """Per item, why it is skipped (None: learn it). ``losses``: the live model's loss on each
        response (nats/token), needed by the ``loss`` decision only."""
        on = set(self.cfg.decisions)
        out: list[Skip | None] = [None] * len(items)
        judged = [i for i, c in enumerate(items) if c.reward > 0 and not c.exempt]
        if not on or not judged:
            return out
        cap: dict[tuple[str, str], int] = {}
        if "fair" in on:
            for kind in sorted({k for i in judged for k, _ in items[i].sources}):
                names = [n for i in judged for k, n in items[i].sources if k == kind]
                cap.update({(kind, n): q for n, q in quotas(names, self.cfg.fair_share).items()})
        taken: collections.Counter[tuple[str, str]] = collections.Counter()
        for i in judged:
            c = items[i]
            digest = content_hash(c.prompt, c.response)
            skip, m = None, None
            if "exact" in on:
                skip = exact_duplicate(self.index.exact_seen(digest))
            if skip is None and "junk" in on:
                skip = junk(text_stats(c.response), self.cfg.junk)
            if skip is None and "loss" in on and losses is not None:
                skip = loss_band(losses[i], self.cfg.loss_low, self.cfg.loss_high)
            if skip is None and "near" in on:
                m = self.index.minhash(c.prompt, c.response)
                skip = near_duplicate(self.index.similarity(m), self.cfg.threshold)
            if skip is None and "fair" in on:
                for src in c.sources:
                    skip = skip or flood(f"{src[0]} {src[1]}", taken[src], cap.get(src, 0), self.cfg.fair_share)
            if skip is None:
                self.index.add(digest, m)
                taken.update(c.sources)
            out[i] = skip
        for c in items:
            if c.exempt and c.reward > 0:  # learned: its copies are duplicates of it from now on
                self.index.add(content_hash(c.prompt, c.response),
                               self.index.minhash(c.prompt, c.response) if "near" in on else None)
        return out
