"""The continual update step: a LoRA adapter on a frozen generation, trained under constraints.

One call to :meth:`ContinualLearner.step` is one optimizer step on a batch that mixes new
interactions with replayed ones. The loss, read top to bottom:

    task     = weighted mean over rows of loss_i   (reward-weighted, see ``example_losses``; a replayed
               row counts ``replay_weight`` of a new row, so replay can steady the update without
               diluting what the new rows teach)
    anchor   = sum ||theta - theta_accepted||^2          ("anchor": L2 toward the last accepted adapter)
    distill  = KL(p_generation || p_adapted) on replayed rows   ("distill": keep old behaviour)
    loss     = task + anchor_weight * anchor + distill_weight * distill

then ("clip") gradients are clipped to ``max_grad_norm`` and the change the optimizer makes to the
adapter in one step is capped (L2) at ``max_update_scale * learning_rate * sqrt(trainable params)``,
the length of a step that moves every coordinate by the learning rate: Adam's steady-state steps
stay under it, while a burst whose gradients jump far beyond what the optimizer has seen (which
Adam turns into steps of up to ~3x the learning rate per coordinate) is held to it. Which terms are on is ``constraints``; an empty set is plain
sequential LoRA fine-tuning.

Reward: ``r > 0`` weights the negative log-likelihood of the response by ``r``; ``r < 0`` applies
unlikelihood, ``-log(1 - p(token))`` weighted by ``|r|``, pushing the response's tokens down;
``r == 0`` carries no loss (the interaction is acknowledged but teaches nothing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before peft and transformers import torchvision

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from learners.config import ALL_CONSTRAINTS, LORA_TARGETS, UpdateConfig  # noqa: F401  (re-exported)
from learners.data import IGNORE, Batch, Example, autocast, chunks, collate, model_device

@dataclass
class StepReport:
    loss: float
    task_loss: float
    anchor: float
    distill: float
    grad_norm: float
    update_norm: float  # the step's L2 change to the adapter, measured when the cap is on (else 0)
    n_new: int
    n_replay: int
    tokens: int  # loss-carrying tokens of every row, replayed ones included
    new_tokens: int  # loss-carrying tokens of the new rows only


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token and the mask of positions that carry loss."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked, mask


def example_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-example reward-weighted loss, [B]; each example's tokens are averaged first."""
    picked, mask = token_logprobs(logits, batch.labels)
    n = mask.sum(-1).clamp(min=1)
    nll = -(picked * mask).sum(-1) / n
    p = picked.exp().clamp(max=1 - 1e-6)
    unlikely = -(torch.log1p(-p) * mask).sum(-1) / n
    r = batch.rewards.to(nll.device)
    return torch.where(r > 0, r * nll, torch.where(r < 0, -r * unlikely, torch.zeros_like(nll)))


@torch.no_grad()
def _scored_rows(model, tokenizer, examples: Sequence[Example], max_seq_len: int, batch_size: int, bf16: bool):
    """Per batch of ``examples``: its labels, each row's summed response NLL and its token count."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        for part in chunks(list(examples), batch_size):
            b = collate(tokenizer, part, max_seq_len, device)
            with autocast(device, bf16):
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            picked, mask = token_logprobs(logits, b.labels)
            yield b.labels, -(picked * mask).sum(-1), mask.sum(-1)
    finally:
        model.train(was_training)


def evaluate_loss(model, tokenizer, examples: Sequence[Example], max_seq_len: int,
                  batch_size: int = 8, bf16: bool = False, per_byte: bool = False) -> float:
    """Mean next-token NLL over the response tokens of ``examples`` (nats/token), or with ``per_byte``
    per UTF-8 byte of the text those tokens spell: the measure that stays comparable when the
    tokenizer changes (a trimmed vocabulary, :mod:`learners.vocab`)."""
    if not examples:
        return float("nan")
    total, count = 0.0, 0
    for labels, nll, tokens in _scored_rows(model, tokenizer, examples, max_seq_len, batch_size, bf16):
        total += float(nll.sum())
        if per_byte:
            count += sum(len(tokenizer.decode(row[row != IGNORE].tolist(), skip_special_tokens=True).encode())
                         for row in labels[:, 1:])
        else:
            count += int(tokens.sum())
    return total / max(1, count)


def item_losses(model, tokenizer, examples: Sequence[Example], max_seq_len: int, batch_size: int = 8,
                bf16: bool = False) -> tuple[list[float], list[int]]:
    """Each example's summed response NLL and its loss-carrying token count (what the gate pairs)."""
    nll, tokens = [], []
    for _labels, n, t in _scored_rows(model, tokenizer, examples, max_seq_len, batch_size, bf16):
        nll += n.tolist()
        tokens += [int(x) for x in t.tolist()]
    return nll, tokens


def load_causal_lm(path: str | Path) -> torch.nn.Module:
    """A generation from the registry, in fp32 (safetensors only)."""
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)


class ContinualLearner:
    """A generation plus a trainable LoRA adapter, updated one constrained step at a time.

    ``accept()`` marks the current adapter as the anchor and the rollback point; ``rollback()``
    returns to it (weights and optimizer state). Persistence is ``save(dir)`` / ``adapter_dir=``.
    """

    def __init__(self, base_dir: str | Path, tokenizer, config: UpdateConfig,
                 adapter_dir: str | Path | None = None) -> None:
        torch.manual_seed(config.seed)
        self.config = config
        self.tokenizer = tokenizer
        base = load_causal_lm(base_dir)
        if adapter_dir is not None:
            self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        else:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                              target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
            self.model = get_peft_model(base, lora)
        self.model.to(config.device).train()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.learning_rate, weight_decay=0.0)
        self._accepted = self._snapshot()

    # -- state -------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        return {
            "params": {n: p.detach().clone() for n, p in self.params.items()},
            "optim": _clone_state(self.optimizer.state_dict()),
        }

    def accept(self) -> None:
        """The current adapter becomes the anchor and the point a rollback returns to."""
        self._accepted = self._snapshot()

    def rollback(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self._accepted["params"][n])
        self.optimizer.load_state_dict(_clone_state(self._accepted["optim"]))

    def configure(self, *, learning_rate: float | None = None, replay_ratio: float | None = None,
                  distill_weight: float | None = None, modules: frozenset[str] | None | object = ...) -> None:
        """The one way to change the learner's knobs between windows; an argument left out keeps its value.

        ``modules``: train the LoRA weights of these modules only (e.g. ``{"q_proj", "v_proj"}``) and
        freeze the rest; ``None`` trains them all. Frozen weights get no gradient, so the optimizer
        leaves them be."""
        if learning_rate is not None:
            self.config.learning_rate = learning_rate
            for g in self.optimizer.param_groups:
                g["lr"] = learning_rate
        if replay_ratio is not None:
            self.config.replay_ratio = replay_ratio
        if distill_weight is not None:
            self.config.distill_weight = distill_weight
        if modules is not ...:
            for name, p in self.params.items():
                p.requires_grad_(modules is None or any(f".{m}." in name for m in modules))

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments (a new task starts from scratch, as in Reptile's inner loop)."""
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=self.config.learning_rate, weight_decay=0.0)

    def save(self, directory: str | Path) -> None:
        """A standard PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
        self.model.save_pretrained(str(directory), safe_serialization=True)

    def update_cap(self) -> float:
        """The largest L2 change one step may make to the adapter (with "clip")."""
        return self.config.max_update_scale * self.config.learning_rate * math.sqrt(self.n_trainable)

    @property
    def n_trainable(self) -> int:
        """Adapter weights being trained now (all of them unless :meth:`configure` froze some)."""
        return sum(p.numel() for p in self.params.values() if p.requires_grad)

    # -- the step ----------------------------------------------------------------------------
    def step(self, new: Sequence[Example], replay: Sequence[Example] = ()) -> StepReport:
        cfg = self.config
        rows = list(new) + list(replay)
        batch = collate(self.tokenizer, rows, cfg.max_seq_len, cfg.device)
        with autocast(cfg.device, cfg.bf16):
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        row_weight = torch.ones(len(rows), device=logits.device)
        row_weight[len(new):] = cfg.replay_weight
        task = (example_losses(logits, batch) * row_weight).sum() / row_weight.sum().clamp(min=1e-8)
        loss = task

        anchor = torch.zeros((), device=loss.device)
        if "anchor" in cfg.constraints and cfg.anchor_weight > 0:
            ref = self._accepted["params"]
            anchor = sum(((p - ref[n]) ** 2).sum() for n, p in self.params.items())
            loss = loss + cfg.anchor_weight * anchor

        distill = torch.zeros((), device=loss.device)
        if "distill" in cfg.constraints and cfg.distill_weight > 0 and replay:
            r = slice(len(new), len(rows))
            with torch.no_grad(), self.model.disable_adapter(), autocast(cfg.device, cfg.bf16):
                ref_logits = self.model(input_ids=batch.input_ids[r], attention_mask=batch.attention_mask[r]).logits
            mask = (batch.labels[r, 1:] != IGNORE)
            p_ref = torch.log_softmax(ref_logits[:, :-1].float(), -1)
            p_cur = torch.log_softmax(logits[r, :-1].float(), -1)
            kl = (p_ref.exp() * (p_ref - p_cur)).sum(-1)
            distill = (kl * mask).sum() / mask.sum().clamp(min=1)
            loss = loss + cfg.distill_weight * distill

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.params.values() if p.requires_grad]
        clip = "clip" in cfg.constraints
        # clip_grad_norm_ returns the norm before clipping; with an infinite bound it only measures.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if clip else math.inf))
        cap = clip and cfg.max_update_scale > 0
        update_norm = 0.0
        if math.isfinite(grad_norm):
            before = [p.detach().clone() for p in params] if cap else None  # only the cap needs a snapshot
            self.optimizer.step()
            if cap:
                with torch.no_grad():
                    deltas = [p - b for p, b in zip(params, before)]
                    update_norm = float(_norm(deltas))
                    limit = self.update_cap()
                    if update_norm > limit:
                        scale = limit / update_norm
                        for p, b, d in zip(params, before, deltas):
                            p.copy_(b + d * scale)
        return StepReport(loss=loss.item(), task_loss=task.item(), anchor=anchor.item(), distill=distill.item(),
                          grad_norm=grad_norm, update_norm=update_norm, n_new=len(new), n_replay=len(replay),
                          tokens=batch.n_tokens, new_tokens=int((batch.labels[: len(new)] != IGNORE).sum()))

    def evaluate(self, examples: Sequence[Example]) -> float:
        return evaluate_loss(self.model, self.tokenizer, examples, self.config.max_seq_len,
                             self.config.batch_size, self.config.bf16)


def _norm(tensors) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _clone_state(state: dict) -> dict:
    def c(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: c(v) for k, v in x.items()}
        if isinstance(x, list):
            return [c(v) for v in x]
        return x
    return c(state)
