"""Reduction: merge the adapter, score MLP neurons on the lineage's own data, prune, heal.

Every function returns a plain dense ``LlamaForCausalLM`` that ``save_pretrained`` writes as a
standard, smaller checkpoint; nothing is masked.

Importance of MLP neuron ``j`` in a layer is ``sqrt(mean a_j^2) * ||W_down[:, j]||``: the root mean
square of the neuron's contribution to the residual stream on this lineage's data (measured here on
SmolLM2 specialized to Python, removing 27% of MLP neurons raised held-out perplexity 1.38x with this
score and 1.51x with ``mean |a_j|`` in its place). Weight
magnitude alone is a poor guide on real models (a layer's most active neuron often has among the
smallest weights), so scores come from activations on calibration data.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from learners.data import Example, autocast, chunks, collate, model_device


class MergeError(RuntimeError):
    pass


@torch.no_grad()
def merge_adapter(peft_model, probe: Sequence[Example], tokenizer, max_seq_len: int,
                  tol: float = 1e-3) -> torch.nn.Module:
    """Merge LoRA into the base in fp32, refusing a merge that changes logits beyond ``tol``.

    The peft model is consumed (its base weights are modified in place).
    """
    peft_model.eval()
    b = collate(tokenizer, list(probe), max_seq_len, model_device(peft_model)) if probe else None
    before = peft_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits if b else None
    merged = peft_model.merge_and_unload()
    merged.to(torch.float32)
    if b is not None:
        after = merged(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        m = b.attention_mask.bool()
        diff = float((after - before).abs()[m].max())
        scale = float(before.abs()[m].max()) or 1.0
        if diff > tol * max(1.0, scale):
            raise MergeError(f"merged logits differ by {diff:.2e} (tolerance {tol * max(1.0, scale):.2e})")
    return merged


@torch.no_grad()
def mlp_importance(model, examples: Sequence[Example], tokenizer, max_seq_len: int,
                   batch_size: int = 8) -> torch.Tensor:
    """Scores [layers, intermediate]: RMS activation into down_proj times its weight column norm."""
    layers = model.model.layers
    device = model_device(model)
    sums = [torch.zeros(l.mlp.down_proj.in_features, device=device) for l in layers]
    count = torch.zeros((), device=device)
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(i):
        def fn(_module, args):
            a = args[0].float()  # [B, T, I]
            m = mask_holder["m"].unsqueeze(-1).to(a.dtype)
            sums[i].add_((a * a * m).sum(dim=(0, 1)))
        return fn

    handles = [l.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, l in enumerate(layers)]
    try:
        model.eval()
        for part in chunks(list(examples), batch_size):
            b = collate(tokenizer, part, max_seq_len, device)
            mask_holder["m"] = b.attention_mask
            count += b.attention_mask.sum()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for h in handles:
            h.remove()
    scores = []
    for i, l in enumerate(layers):
        col_norm = l.mlp.down_proj.weight.float().norm(dim=0)
        scores.append((sums[i] / count.clamp(min=1)).sqrt() * col_norm)
    return torch.stack(scores)


def magnitude_importance(model) -> torch.Tensor:
    """The baseline: weight norms only (rows of gate/up, column of down)."""
    out = []
    for l in model.model.layers:
        mlp = l.mlp
        out.append(mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0))
    return torch.stack(out)


@torch.no_grad()
def prune_mlp(model, scores: torch.Tensor, width: int) -> LlamaForCausalLM:
    """A new dense model keeping the ``width`` highest-scoring neurons of every layer's MLP."""
    cfg: LlamaConfig = copy.deepcopy(model.config)
    cfg.intermediate_size = int(width)
    small = LlamaForCausalLM(cfg).to(torch.float32).to(model_device(model))
    state = model.state_dict()
    new_state = {}
    keep = [torch.sort(torch.topk(s, width).indices).values for s in scores]
    for name, t in state.items():
        parts = name.split(".")
        if "mlp" in parts:
            li = int(parts[parts.index("layers") + 1])
            idx = keep[li]
            if "down_proj" in parts:
                t = t[:, idx]
            else:  # gate_proj / up_proj rows
                t = t[idx]
        new_state[name] = t.clone()
    missing, unexpected = small.load_state_dict(new_state, strict=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"pruned state mismatch: missing={missing} unexpected={unexpected}")
    if cfg.tie_word_embeddings:
        small.tie_weights()
    small.generation_config = copy.deepcopy(model.generation_config)
    return small


def heal(student, teacher, examples: Sequence[Example], tokenizer, max_seq_len: int, steps: int,
         lr: float = 5e-5, batch_size: int = 4, temperature: float = 1.0, bf16: bool = False,
         progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Distil ``teacher`` into ``student`` (KL on response-token logits) for ``steps`` steps."""
    if steps <= 0 or not examples:
        return []
    teacher.eval()
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    device = model_device(student)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=g).tolist()
        b = collate(tokenizer, [examples[i] for i in idx], max_seq_len, device)
        with autocast(device, bf16):
            with torch.no_grad():
                t_logits = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            s_logits = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        mask = b.attention_mask.bool()
        t = F.log_softmax(t_logits[mask].float() / temperature, -1)
        s = F.log_softmax(s_logits[mask].float() / temperature, -1)
        loss = (t.exp() * (t - s)).sum(-1).mean() * temperature ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, steps, losses[-1])
    student.eval()
    return losses


def count_parameters(model) -> int:
    """Unique model parameters (a tied embedding counts once; LoRA adapter weights are not counted)."""
    unique = {id(p): p for n, p in model.named_parameters(remove_duplicate=False) if "lora_" not in n}
    return sum(p.numel() for p in unique.values())
