"""Rapid adaptation: a meta-learned starting point for new LoRA adapters (first-order Reptile).

Reptile (Nichol, Achiam and Schulman, 2018), read top to bottom: start from the standard LoRA
initialization ``phi``; each round, copy ``phi``, adapt the copy to one task for ``inner_steps``
plain Adam steps, and move ``phi`` a fraction ``eps`` of the way to the adapted weights (``eps``
decays linearly to zero). Over the rounds ``phi`` settles where every task is a few steps away.

Here a task is one source (``domain``) of the replay data the existing lineages keep, and the
model is the frozen generation the new adapter will sit on, so the result fits that generation's
shapes. The output is a standard PEFT adapter directory a :class:`ContinualLearner` starts from.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from learners.data import Example
from learners.update import ContinualLearner, UpdateConfig


@dataclass(frozen=True)
class ReptileConfig:
    rounds: int  # CASCADE_META_ROUNDS in the daemon
    inner_steps: int  # CASCADE_META_INNER_STEPS
    meta_lr: float = 0.5  # eps at the first round
    inner_lr: float = 2e-3
    batch_size: int = 8


def reptile(base_dir: str | Path, tokenizer, tasks: dict[str, Sequence[Example]], update: UpdateConfig,
            cfg: ReptileConfig, out_dir: str | Path, progress=None) -> Path:
    """Meta-learn an adapter initialization over ``tasks`` on generation ``base_dir``; save it to ``out_dir``."""
    names = sorted(t for t in tasks if tasks[t])
    if not names:
        raise ValueError("reptile needs at least one task with examples")
    inner = replace(update, constraints=frozenset(), learning_rate=cfg.inner_lr, batch_size=cfg.batch_size)
    learner = ContinualLearner(base_dir, tokenizer, inner)
    phi = {n: p.detach().clone() for n, p in learner.params.items()}
    rng = random.Random(update.seed)
    for r in range(cfg.rounds):
        task = list(tasks[names[r % len(names)]])
        with torch.no_grad():
            for n, p in learner.params.items():
                p.copy_(phi[n])
        learner.reset_optimizer()
        for _ in range(cfg.inner_steps):
            learner.step(rng.sample(task, min(cfg.batch_size, len(task))))
        eps = cfg.meta_lr * (1 - r / cfg.rounds)
        with torch.no_grad():
            for n, p in learner.params.items():
                phi[n] += eps * (p.detach() - phi[n])
        if progress is not None:
            progress(r + 1, cfg.rounds, names[r % len(names)])
    with torch.no_grad():
        for n, p in learner.params.items():
            p.copy_(phi[n])
    learner.save(out_dir)
    return Path(out_dir)
