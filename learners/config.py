"""What one continual update is configured by: plain data, importable without torch.

The daemon's settings (``daemon.config``) build an :class:`UpdateConfig`; processes that only read
the stream (the CLI, the ingest actor, the driver) import this module and never load torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALL_CONSTRAINTS = frozenset({"anchor", "distill", "clip"})  # the loss terms; replay is ``replay_ratio``'s alone
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class UpdateConfig:
    """The update step's knobs. These defaults are the project's: ``daemon.config.Settings`` takes its
    defaults from here, so they are written once."""

    lora_rank: int = 16
    learning_rate: float = 2e-4
    batch_size: int = 8
    max_seq_len: int = 256
    replay_ratio: float = 0.4  # share of each batch drawn from replay; 0 = no replay
    replay_weight: float = 0.5  # a replayed row's share of the task loss relative to a new row's
    constraints: frozenset[str] = field(default_factory=lambda: frozenset({"distill", "clip"}))
    anchor_weight: float = 1.0
    distill_weight: float = 0.5
    max_grad_norm: float = 1.0
    max_update_scale: float = 1.0
    bf16: bool = False
    activation_checkpointing: bool = False  # recompute decoder activations in the backward pass (less memory)
    device: str = "cpu"  # "cpu" or "cuda[:N]"; the adapter, the frozen generation and batches all live there
    seed: int = 0

    def replay_count(self) -> int:
        """Replayed rows per batch: ``replay_ratio`` of ``batch_size`` (at least one when the ratio is above 0)."""
        if self.replay_ratio <= 0:
            return 0
        return max(1, round(self.batch_size * self.replay_ratio))

    def new_per_step(self) -> int:
        """New rows per batch: the rest of ``batch_size`` (at least one). An update window is
        ``window_steps`` of these."""
        return max(1, self.batch_size - self.replay_count())
