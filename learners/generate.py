"""Batched decoding for answering requests: plain torch, one forward per new token for the whole batch.

A :class:`RunningBatch` decodes rows of one model together (left-padded, KV cache), each row with its own
sampling (greedy when ``temperature == 0``, else temperature + top-p with a per-row seed) and its own
``max_tokens``. :meth:`RunningBatch.step` picks every row's next token, hands them to ``on_step``, which
answers which rows must stop early (a stop string, a client gone), drops the rows that ended (a row also
stops at an end-of-sequence token or its ``max_tokens``) and runs the forward for the rest.
:meth:`RunningBatch.join` adds rows between steps (continuous batching): their prompts are prefilled
together and their caches merged into the batch's, the shorter side left-padded and masked, so a request
that arrives while others decode starts at the next step instead of waiting for the batch to end. Keys are
still rotated by their own positions (each row keeps its own position ids), so padding changes nothing.

``decode`` / ``decode_steps`` run a fixed set of prompts to the end (all at once / one step at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def _pick(logits: torch.Tensor, sampling: Sequence[Sampling], generators: Sequence[torch.Generator | None]) -> list[int]:
    """One next token per row of ``logits`` [rows, vocab]."""
    out = []
    for row, s, g in zip(logits, sampling, generators):
        if s.temperature <= 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row.float() / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < s.top_p  # the smallest prefix whose mass reaches top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def decode(model, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling], eos_ids: set[int], pad_id: int,
           on_step: Callable[[dict[int, int]], set[int]]) -> None:
    """Decode ``prompts`` together. ``on_step({row: token})`` gets each step's new tokens (rows by their index
    in ``prompts``) and returns the rows to stop now. Returns when every row has stopped."""
    for _ in decode_steps(model, prompts, sampling, eos_ids, pad_id, on_step):
        pass


def decode_steps(model, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling], eos_ids: set[int],
                 pad_id: int, on_step: Callable[[dict[int, int]], set[int]]) -> Iterator[None]:
    """``decode``, yielding after each step (the prompts' forward pass is in the first one)."""
    batch = RunningBatch(model, eos_ids, pad_id)
    batch.join(list(range(len(prompts))), prompts, sampling)
    while batch.step(on_step)[1]:
        yield


@dataclass
class _Row:
    sampling: Sampling
    generator: torch.Generator | None
    count: int = 0  # tokens picked so far


class RunningBatch:
    """Rows of one model decoding together, each known by a key; rows join between steps and leave when done.

    Between steps the batch holds, for its rows in order: the KV cache, the attention mask (as wide as the
    cache), each row's last position and the logits its next token is picked from. Every method runs in
    inference mode on its own, so batches of several models stepped in turn from one thread do not
    disturb each other."""

    def __init__(self, model, eos_ids: set[int], pad_id: int) -> None:
        self.model, self.eos_ids, self.pad_id = model, set(eos_ids), pad_id
        self.device = next(model.parameters()).device
        self.keys: list = []
        self.rows: dict = {}
        self.cache = self.mask = self.position = self.last = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def can_join(self) -> bool:
        """Whether rows may join while others decode: every cache layer is a plain growing one (a sliding
        window or quantized cache cannot be merged this way)."""
        from transformers.cache_utils import DynamicLayer

        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, keys: Sequence, prompts: Sequence[Sequence[int]], sampling: Sequence[Sampling]) -> None:
        """Prefill ``prompts`` (one forward for all of them) and add them as rows ``keys``; their first
        token is picked at the next :meth:`step`. The batch is unchanged if the forward fails."""
        if not prompts:
            return
        with torch.inference_mode():
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
                mask[i, width - len(p):] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            cache, last, position = out.past_key_values, out.logits[:, -1, :], positions[:, -1:]
            if self.cache is None:
                self.cache, self.mask, self.position, self.last = cache, mask, position, last
            else:
                if not self.can_join:
                    raise TypeError("this model's cache cannot take rows while others decode")
                gap = self.mask.shape[1] - width  # > 0: the new rows are shorter; < 0: the batch is
                for mine, theirs in zip(self.cache.layers, cache.layers):
                    mine.keys = torch.cat([_pad_left(mine.keys, -gap, 2), _pad_left(theirs.keys, gap, 2)])
                    mine.values = torch.cat([_pad_left(mine.values, -gap, 2), _pad_left(theirs.values, gap, 2)])
                self.mask = torch.cat([_pad_left(self.mask, -gap, 1), _pad_left(mask, gap, 1)])
                self.position = torch.cat([self.position, position])
                self.last = torch.cat([self.last, last])
        for key, s in zip(keys, sampling):
            g = None
            if s.temperature > 0:
                g = torch.Generator()
                g.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**31 - 1, ())))
            self.rows[key] = _Row(s, g)
            self.keys.append(key)

    def step(self, on_step: Callable[[dict], set]) -> tuple[list, bool]:
        """Pick each row's next token and give them to ``on_step({key: token})``, which returns the keys to stop
        now; drop the rows that ended and run the forward for the others. Returns the keys that left and
        whether any row is left."""
        if not self.keys:
            return [], False
        with torch.inference_mode():
            rows = [self.rows[k] for k in self.keys]
            tokens = _pick(self.last.to("cpu"), [r.sampling for r in rows], [r.generator for r in rows])
            stop = on_step(dict(zip(self.keys, tokens)))
            keep, left = [], []
            for j, (key, row, t) in enumerate(zip(self.keys, rows, tokens)):
                row.count += 1
                if t not in self.eos_ids and row.count < row.sampling.max_tokens and key not in stop:
                    keep.append(j)
                else:
                    left.append(key)
                    del self.rows[key]
            if not keep:
                self.keys, self.cache = [], None
                return left, False
            if len(keep) < len(self.keys):
                index = torch.tensor(keep, device=self.device)
                self.cache.batch_select_indices(index)
                self.mask, self.position = self.mask[index], self.position[index]
                tokens = [tokens[j] for j in keep]
                self.keys = [self.keys[j] for j in keep]
            step = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
            self.mask = torch.cat([self.mask, torch.ones_like(step)], dim=1)
            self.position = self.position + 1
            out = self.model(input_ids=step, attention_mask=self.mask, position_ids=self.position, cache=self.cache,
                             use_cache=True, logits_to_keep=1)
            self.cache, self.last = out.past_key_values, out.logits[:, -1, :]
        return left, True


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with ``n`` zeros before it along ``dim`` (itself for n <= 0)."""
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)
