"""Batched decoding for answering requests: plain torch, one forward per new token for the whole batch.

``decode`` runs several prompts of one model together (left-padded, KV cache), each row with its own
sampling (greedy when ``temperature == 0``, else temperature + top-p with a per-row seed) and its own
``max_tokens``. After every step it hands the batch's new tokens to ``on_step``, which answers which
rows must stop early (a stop string, a client gone); a row also stops at an end-of-sequence token.
Finished rows are dropped from the batch, so a long answer does not make the short ones pay.

``decode_steps`` is the same decoding one step at a time (a generator), so that a scheduler can interleave
batches of different models (serving's batcher does, to start a new version's batch without waiting for
the old one to finish).
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
    """``decode``, yielding after each step's ``on_step`` (the prompt's forward pass is in the first step).
    Each step runs in inference mode on its own, so generators interleaved in one thread do not disturb it."""
    with torch.inference_mode():
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        generators = []
        for s in sampling:
            g = None
            if s.temperature > 0:
                g = torch.Generator()
                g.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**31 - 1, ())))
            generators.append(g)
        rows = list(range(len(prompts)))  # the original index of each row still in the batch
        counts = [0] * len(prompts)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, last = out.past_key_values, out.logits[:, -1, :]
        position = positions[:, -1:]
    while rows:
        with torch.inference_mode():
            tokens = _pick(last.to("cpu"), [sampling[r] for r in rows], [generators[r] for r in rows])
            stop = on_step(dict(zip(rows, tokens)))
            keep = []
            for j, (r, t) in enumerate(zip(rows, tokens)):
                counts[r] += 1
                if t not in eos_ids and counts[r] < sampling[r].max_tokens and r not in stop:
                    keep.append(j)
            if not keep:
                return
            if len(keep) < len(rows):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask, position = mask[index], position[index]
                tokens = [tokens[j] for j in keep]
                rows = [rows[j] for j in keep]
            step = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            position = position + 1
            out = model(input_ids=step, attention_mask=mask, position_ids=position, cache=cache, use_cache=True,
                        logits_to_keep=1)
            cache, last = out.past_key_values, out.logits[:, -1, :]
        yield
