"""Examples and how they become tensors.

An :class:`Example` is one interaction as the learners see it: the model is conditioned on
``prompt`` and learns to produce ``response``. Only response tokens carry loss; prompt tokens are
masked with ``-100``. ``reward`` weights the example (see :func:`learners.update.token_losses`).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

IGNORE = -100


@dataclass(frozen=True)
class Example:
    id: str
    prompt: str
    response: str
    reward: float = 1.0
    domain: str = "default"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Example":
        return cls(
            id=str(d["id"]),
            prompt=str(d["prompt"]),
            response=str(d["response"]),
            reward=float(d.get("reward", 1.0)),
            domain=str(d.get("domain", "default")),
        )

    def stable_hash(self) -> int:
        """A hash of the id that is the same in every process and on every run."""
        return int.from_bytes(hashlib.blake2b(self.id.encode(), digest_size=8).digest(), "big")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where no loss
    rewards: torch.Tensor  # [B]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels,
                                                                  self.rewards)))

    @property
    def n_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def encode(tokenizer, ex: Example, max_seq_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example, truncated to ``max_seq_len``.

    The response is what is learned, so when the pair is too long the prompt loses its head first
    (the model keeps the context nearest the response), then the response loses its tail.
    """
    p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
    r = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None:
        r = r + [eos]
    r = r[:max_seq_len]
    p = p[max(0, len(p) - (max_seq_len - len(r))) :] if max_seq_len > len(r) else []
    ids = p + r
    labels = [IGNORE] * len(p) + r
    return ids, labels


def collate(tokenizer, examples: Sequence[Example], max_seq_len: int, device: torch.device | str = "cpu") -> Batch:
    """Right-padded batch on ``device``; padding carries no loss and no attention."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [encode(tokenizer, ex, max_seq_len) for ex in examples]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    rewards = torch.tensor([ex.reward for ex in examples], dtype=torch.float32)
    batch = Batch(input_ids, mask, labels, rewards)
    return batch if torch.device(device).type == "cpu" else batch.to(device)


def autocast(device: torch.device | str, bf16: bool):
    """bf16 autocast on ``device`` when asked (CPU or CUDA), otherwise plain fp32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
