"""The continual update step: a LoRA adapter on a frozen generation, trained under constraints.

One call to :meth:`ContinualLearner.step` is one optimizer step on a batch that mixes new
interactions with replayed ones. The loss, read top to bottom:

    task     = weighted mean over rows of loss_i   (reward-weighted, see ``token_losses``; a replayed
               row counts ``replay_weight`` of a new row, so replay can steady the update without
               diluting what the new rows teach)
    anchor   = sum ||theta - theta_accepted||^2          ("anchor": L2 toward the last accepted adapter)
    distill  = KL(p_teacher || p_adapted) on replayed rows   ("distill": keep old behaviour; the teacher is
               the row's best stored prediction, else the generation for a source not arriving, where it
               gives the next token at least the adapted model's probability: ``Teachers``)
    loss     = task + anchor_weight * anchor + distill_weight * distill

then ("clip") gradients are clipped to ``max_grad_norm`` and the change the optimizer makes to the
adapter in one step is capped (L2) at ``max_update_scale * learning_rate * sqrt(trainable params)``,
the length of a step that moves every coordinate by the learning rate: Adam's steady-state steps
stay under it, while a burst whose gradients jump far beyond what the optimizer has seen (which
Adam turns into steps of up to ~3x the learning rate per coordinate) is held to it. Which terms are on is ``constraints``; an empty set is plain
sequential LoRA fine-tuning.

Memory: the vocabulary is large (49,152 for SmolLM2), so logits are never made whole. The decoder's hidden
states are taken at the positions that carry loss only (response tokens), and the output projection, the
log-softmax, the loss and its backward run over ``LOGIT_CHUNK`` of those positions at a time
(``response_logprobs`` / the step's chunk loop): at batch 8 x 256 tokens a whole fp32 logits tensor is
400 MB, and the loss, the teacher and their gradients held several. ``activation_checkpointing``
recomputes each decoder layer's activations in the backward pass instead of keeping them. Measured on
SmolLM2-135M at the defaults (``learners/allocator.py`` has the figures): peak RSS of a step 8.6 GB before,
3.8 GB with chunked logits and the allocator pinned, 1.6 GB with activation checkpointing as well.

Reward: ``r > 0`` weights the negative log-likelihood of the response by ``r``; ``r < 0`` applies
unlikelihood, ``-log(1 - p(token))`` weighted by ``|r|``, pushing the response's tokens down;
``r == 0`` carries no loss (the interaction is acknowledged but teaches nothing).
"""
from __future__ import annotations

import itertools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before peft and transformers import torchvision

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from learners.allocator import pin_mmap_threshold
from learners.config import ALL_CONSTRAINTS, LORA_TARGETS, UpdateConfig  # noqa: F401  (re-exported)
from learners.data import IGNORE, Batch, Example, autocast, chunks, collate, model_device
from learners.replay import Prediction
from learners.timing import Timings

@dataclass
class StepReport:
    loss: float
    task_loss: float
    anchor: float
    distill: float
    update_norm: float  # the step's L2 change to the adapter, measured when the cap is on (else 0)
    n_replay: int
    tokens: int  # loss-carrying tokens of every row, replayed ones included
    new_tokens: int  # loss-carrying tokens of the new rows only
    predictions: dict[str, Prediction] = field(default_factory=dict)  # the replayed rows', before the step
    # seconds per phase: batch (tokenize, pad, loss positions), forward (the decoder), teacher (the
    # generation's forward on replayed rows without a stored prediction), head_loss (output projection,
    # loss and distillation and their backward, by chunks), backward (the decoder's), optimizer (clip, step, cap)
    seconds: dict[str, float] = field(default_factory=dict)


LOGIT_CHUNK = 1 << 24  # logits elements (positions x vocabulary) made at a time: 64 MB in fp32
PREDICTION_TOP_K = 8  # tokens a stored prediction keeps per position (the rest of the mass is one bucket)


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A causal LM's decoder (hidden states) and its output projection; through a PEFT wrapper, whose LoRA
    layers live inside the decoder."""
    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    return lm.get_decoder(), lm.get_output_embeddings()


def loss_positions(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where loss is carried: the mask [B, T-1] over next-token positions, each such position's row [N] and
    its target token [N] (row-major, so a row's positions are contiguous)."""
    target = batch.labels[:, 1:]
    mask = target != IGNORE
    return mask, mask.nonzero()[:, 0], target[mask]


def chunk_slices(n: int, vocab: int) -> list[slice]:
    size = max(1, LOGIT_CHUNK // max(1, vocab))
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def chunk_logp(head, h: torch.Tensor, device, bf16: bool) -> torch.Tensor:
    """Log-softmax over the vocabulary (fp32) of the head applied to a chunk of hidden states."""
    with autocast(device, bf16):
        logits = head(h)
    return torch.log_softmax(logits.float(), -1)


def response_logprobs(model, batch: Batch, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability [N] of each loss-carrying next token and its row [N], without gradients."""
    decoder, head = decoder_and_head(model)
    mask, rows, target = loss_positions(batch)
    with autocast(batch.input_ids.device, bf16):
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).last_hidden_state
    h = hidden[:, :-1][mask]
    picked = torch.empty(len(target), device=h.device)
    for c in chunk_slices(len(target), head.out_features):
        picked[c] = chunk_logp(head, h[c], batch.input_ids.device, bf16).gather(-1, target[c].unsqueeze(-1)).squeeze(-1)
    return picked, rows


def token_losses(logp: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Each position's loss given its token's log-probability and its row's reward: ``r * nll`` (r > 0),
    ``|r| * -log(1 - p)`` (r < 0), 0 (r == 0)."""
    p = logp.exp().clamp(max=1 - 1e-6)
    return torch.where(rewards > 0, -rewards * logp,
                       torch.where(rewards < 0, -rewards * -torch.log1p(-p), torch.zeros_like(logp)))


@torch.no_grad()
def _scored_rows(model, tokenizer, examples: Sequence[Example], max_seq_len: int, batch_size: int, bf16: bool):
    """Per batch of ``examples``: its labels, each row's summed response NLL and its token count."""
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        for part in chunks(list(examples), batch_size):
            b = collate(tokenizer, part, max_seq_len, device)
            picked, rows = response_logprobs(model, b, bf16)
            nll = torch.zeros(len(part), device=picked.device).index_add_(0, rows, -picked)
            yield b.labels, nll, torch.bincount(rows, minlength=len(part))
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
        pin_mmap_threshold()  # a step's freed activations go back to the system (learners/allocator.py)
        self.config = config
        self.tokenizer = tokenizer
        base = load_causal_lm(base_dir)
        if config.activation_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if adapter_dir is not None:
            self.model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
        else:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                              target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
            self.model = get_peft_model(base, lora)
        self.model.to(config.device).train()
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.reset_optimizer()
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

    @contextmanager
    def accepted_weights(self):
        """The accepted adapter's weights in place while the block runs (to measure it again), the current
        ones back after it; the optimizer is not touched."""
        current = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self._accepted["params"][n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(current[n])

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

    def reset_optimizer(self, kind: type[torch.optim.Optimizer] = torch.optim.AdamW, **options) -> None:
        """Forget the optimizer's moments (a new task starts from scratch, as in Reptile's inner loop); ``kind``
        and ``options`` give another optimizer (plain SGD makes a step's size readable from its gradient)."""
        options = {"lr": self.config.learning_rate, **({"weight_decay": 0.0} if kind is torch.optim.AdamW else {}),
                   **options}
        self.optimizer = kind(self.params.values(), **options)

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
    def step(self, new: Sequence[Example], replay: Sequence[Example] = (),
             teachers: Sequence[Prediction | None] = ()) -> StepReport:
        """One optimizer step on ``new`` plus ``replay``. ``teachers[j]`` is replayed row j's stored
        :class:`Prediction` (or None). The report's ``predictions`` are the replayed rows' predictions
        before this step, for the store to keep if the window is accepted."""
        cfg, timed = self.config, Timings()
        rows = list(new) + list(replay)
        with timed("batch"):
            batch = collate(self.tokenizer, rows, cfg.max_seq_len, cfg.device)
            decoder, head = decoder_and_head(self.model)
            mask, row_of, target = loss_positions(batch)
        with timed("forward"), autocast(cfg.device, cfg.bf16):
            hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state
        h = hidden[:, :-1][mask]  # [N, hidden]: the loss-carrying positions, in the graph of the decoder
        # Each position's share of the task loss: its row's weight over the batch's, spread over the row's tokens.
        row_weight = torch.ones(len(rows), device=h.device)
        row_weight[len(new):] = cfg.replay_weight
        per_row = mask.sum(1).clamp(min=1)
        share = (row_weight / row_weight.sum().clamp(min=1e-8) / per_row)[row_of]
        rewards = batch.rewards.to(h.device)[row_of]

        distilling = "distill" in cfg.constraints and cfg.distill_weight > 0 and bool(replay)
        with timed("teacher"):
            teach = Teachers(self.model, batch, mask, new, replay, teachers, cfg) if distilling else None

        # The head, the loss and their backward, a chunk of positions at a time; the decoder's backward once.
        self.optimizer.zero_grad(set_to_none=True)
        h_leaf = h.detach().requires_grad_()
        task_sum = distill_sum = 0.0
        for c in chunk_slices(len(target), head.out_features):
            with timed("head_loss"):
                logp = chunk_logp(head, h_leaf[c], cfg.device, cfg.bf16)
                picked = logp.gather(-1, target[c].unsqueeze(-1)).squeeze(-1)
                chunk_task = (token_losses(picked, rewards[c]) * share[c]).sum()
                chunk_loss = chunk_task
                task_sum += float(chunk_task.detach())
            if teach is not None:
                with timed("teacher"):  # the stored predictions' top k, and the generation's head on its rows
                    teach.observe(c, logp.detach(), picked.detach())
                    kl = teach.kl(c, logp, target[c])
                if kl is not None:
                    chunk_loss = chunk_loss + cfg.distill_weight * kl
                    distill_sum += float(kl.detach())
            with timed("head_loss"):
                chunk_loss.backward()
        task = torch.tensor(task_sum)
        distill = torch.tensor(distill_sum)
        surrogate = (h * h_leaf.grad).sum() if h_leaf.grad is not None else h.sum() * 0.0

        anchor = torch.zeros((), device=h.device)
        if "anchor" in cfg.constraints and cfg.anchor_weight > 0:
            ref_params = self._accepted["params"]
            anchor = sum(((p - ref_params[n]) ** 2).sum() for n, p in self.params.items())
            surrogate = surrogate + cfg.anchor_weight * anchor
        loss = task + cfg.anchor_weight * anchor.detach() + cfg.distill_weight * distill

        with timed("backward"):
            surrogate.backward()  # d(loss)/d(hidden) from the chunks, through the decoder and its LoRA layers
        t_opt = time.perf_counter()
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
        timed["optimizer"] = time.perf_counter() - t_opt
        return StepReport(loss=loss.item(), task_loss=task.item(), anchor=anchor.item(), distill=distill.item(),
                          update_norm=update_norm, n_replay=len(replay),
                          tokens=batch.n_tokens, new_tokens=int((batch.labels[: len(new)] != IGNORE).sum()),
                          predictions=teach.predictions() if teach is not None else {}, seconds=dict(timed))

    def evaluate(self, examples: Sequence[Example]) -> float:
        return evaluate_loss(self.model, self.tokenizer, examples, self.config.max_seq_len,
                             self.config.batch_size, self.config.bf16)


class Teachers:
    """What distillation pulls each replayed row of one step toward, and the predictions the step takes.

    A replayed row with a stored :class:`Prediction` (made on this generation, of its length) is pulled
    toward it: KL over its ``k`` tokens and one bucket for the rest of the mass. A row without one is
    pulled toward the generation (the adapter off: what the lineage knew before it) unless its source
    is among the step's new rows — a source that is arriving is being learned, not kept — and only at
    the positions where the generation gives the text's next token at least the student's probability
    (where the lineage learned beyond the generation, the pull would undo that learning). The loss is
    the mean KL over the positions that have a teacher. :meth:`observe` takes the top ``k`` of every
    replayed position's prediction as the chunks go by; :meth:`predictions` hands them out per row.
    """

    def __init__(self, model, batch: Batch, mask: torch.Tensor, new: Sequence[Example], replay: Sequence[Example],
                 teachers: Sequence[Prediction | None], cfg: UpdateConfig) -> None:
        self.replay, n_new, self.cfg = list(replay), len(new), cfg
        _, self.head = decoder_and_head(model)
        offsets = [0, *itertools.accumulate(mask.sum(1).tolist())]  # row i's positions: offsets[i]..offsets[i+1]
        self.first = offsets[n_new]
        self.spans = [(offsets[n_new + j], offsets[n_new + j + 1]) for j in range(len(self.replay))]
        arriving = {ex.domain for ex in new}
        gen_rows, stored = [], []
        for j, ex in enumerate(self.replay):
            t = teachers[j] if j < len(teachers) else None
            lo, hi = self.spans[j]
            if t is not None and len(t.tokens) == hi - lo and hi > lo:
                stored.append((j, t))
            elif ex.domain not in arriving and hi > lo:
                gen_rows.append(j)
        device = batch.input_ids.device
        self.gen_pos = _positions([self.spans[j] for j in gen_rows], device)
        self.ref_h = None
        if gen_rows:
            idx = torch.tensor([n_new + j for j in gen_rows], device=device)
            decoder, _ = decoder_and_head(model)  # the adapter's layers live inside it; switched off here
            with torch.no_grad(), model.disable_adapter(), autocast(device, cfg.bf16):
                ref = decoder(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx],
                              use_cache=False).last_hidden_state
            self.ref_h = ref[:, :-1][mask[idx]]  # aligned with gen_pos
        self.stored_pos = _positions([self.spans[j] for j, _ in stored], device)
        self.t_tokens = torch.cat([t.tokens for _, t in stored]).long().to(device) if stored else None
        self.t_logp = torch.cat([t.logp for _, t in stored]).float().to(device) if stored else None
        self.n_taught = max(1, len(self.gen_pos) + len(self.stored_pos))
        n = offsets[-1] - self.first
        self.top_tokens = torch.zeros(n, PREDICTION_TOP_K, dtype=torch.int32)
        self.top_logp = torch.zeros(n, PREDICTION_TOP_K, dtype=torch.float16)
        self.picked = torch.zeros(n)

    def observe(self, c: slice, logp: torch.Tensor, picked: torch.Tensor) -> None:
        lo = max(c.start, self.first)
        if lo >= c.stop:
            return
        top = logp[lo - c.start:].topk(min(PREDICTION_TOP_K, logp.shape[-1]), -1)
        at = slice(lo - self.first, c.stop - self.first)
        self.top_tokens[at, : top.indices.shape[-1]] = top.indices.int().cpu()
        self.top_logp[at, : top.values.shape[-1]] = top.values.half().cpu()
        self.picked[at] = picked[lo - c.start:].float().cpu()

    def kl(self, c: slice, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
        """The distillation loss of chunk ``c`` (``logp``: the student's log-probabilities there, ``target``
        the tokens that follow). The generation teaches only where it gives the text's own next token at
        least the student's probability: where the lineage has learned beyond it (a source learned after
        the generation was made), pulling toward it would undo that learning, not keep anything."""
        total = None
        lo, hi = _within(self.gen_pos, c)
        if hi > lo:
            at = self.gen_pos[lo:hi] - c.start
            with torch.no_grad():
                ref = chunk_logp(self.head, self.ref_h[lo:hi], self.cfg.device, self.cfg.bf16)
                t = target[at].unsqueeze(-1)
                knows = (ref.gather(-1, t) >= logp[at].gather(-1, t)).squeeze(-1)
            total = ((ref.exp() * (ref - logp[at])).sum(-1) * knows).sum()
        lo, hi = _within(self.stored_pos, c)
        if hi > lo:
            student = logp[self.stored_pos[lo:hi] - c.start].gather(-1, self.t_tokens[lo:hi])
            kl = top_k_kl(self.t_logp[lo:hi], student)
            total = kl if total is None else total + kl
        return None if total is None else total / self.n_taught

    def predictions(self) -> dict[str, Prediction]:
        out = {}
        for ex, (lo, hi) in zip(self.replay, self.spans):
            a, b = lo - self.first, hi - self.first
            if b > a:
                out[ex.id] = Prediction(self.top_tokens[a:b].clone(), self.top_logp[a:b].clone(),
                                        float(-self.picked[a:b].mean()))
        return out


def top_k_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over positions, both given as log-probabilities [N, k] of the
    teacher's ``k`` tokens, the rest of each distribution's mass counted as one more outcome."""
    p = teacher.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=1e-6)
    q_rest = (1 - student.exp().sum(-1)).clamp(min=1e-6)
    return (p * (teacher - student)).sum() + (p_rest * (p_rest.log() - q_rest.log())).sum()


def _positions(spans: list[tuple[int, int]], device) -> torch.Tensor:
    """The positions of ``spans`` (ascending, non-overlapping) as one sorted index tensor."""
    if not spans:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(lo, hi, device=device) for lo, hi in spans])


def _within(positions: torch.Tensor, c: slice) -> tuple[int, int]:
    """The range of the sorted ``positions`` that falls in chunk ``c``."""
    lo, hi = torch.searchsorted(positions, torch.tensor([c.start, c.stop], device=positions.device)).tolist()
    return lo, hi


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
