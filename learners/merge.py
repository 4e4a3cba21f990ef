"""A saved LoRA adapter merged into a copy of its generation that shares every tensor the adapter leaves alone.

What serving does on every swap: ``W' = W + (lora_alpha / r) * B @ A`` for each adapted linear layer, written
out with plain tensors. The copy shares the generation's other tensors (embeddings, the tied head, norms,
rotary buffers): nothing of the generation is written, so a request still decoding on it, or on another
version, is untouched. PEFT's ``PeftModel.from_pretrained(deepcopy(base)).merge_and_unload()`` gives the same
weights (a test checks it) at about three times the cost on these CPUs: a copy of every tensor, then the
LoRA layers wrapped in and unwrapped again.

Only the adapters the learner saves are accepted (plain LoRA on linear layers: no DoRA, rsLoRA, per-module
ranks, bias or saved whole modules); any other gets a ``ValueError`` naming what it uses. Safetensors only.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# adapter_config.json fields whose non-default values change the merge formula; what the learner never writes.
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
               "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}


def lora_factors(adapter_dir: Path) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The adapter's scale and each adapted linear layer's ``(B, A)``, by module name
    (``model.layers.0.self_attn.q_proj``): its weight changes by ``scale * B @ A``."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: peft_type {config.get('peft_type')!r} is not LORA")
    for key, plain in UNSUPPORTED.items():
        if config.get(key, plain) not in (plain, None, {}, [], False):
            raise ValueError(f"{adapter_dir}: the adapter uses {key}={config[key]!r}, which serving does not merge")
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    factors = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} in a LoRA adapter")
            continue
        stem = key[:-len(".lora_A.weight")]
        factors[stem.removeprefix("base_model.model.")] = (tensors[f"{stem}.lora_B.weight"], a)
    return scale, factors


def merged_copy(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """``base`` with the adapter in ``adapter_dir`` merged, as a new module; ``base`` is not modified."""
    modules = dict(base.named_modules())
    memo: dict[int, object] = {}
    scale, factors = lora_factors(Path(adapter_dir))
    for name, (b, a) in factors.items():
        layer = modules.get(name)
        if not isinstance(layer, torch.nn.Linear) or layer.weight.shape != (b.shape[0], a.shape[1]):
            raise ValueError(f"{adapter_dir}: the adapter's {name!r} does not match a linear layer of the model")
        w = layer.weight
        merged = torch.addmm(w.float(), b.float(), a.float(), alpha=scale).to(w.dtype)
        memo[id(w)] = torch.nn.Parameter(merged, requires_grad=False)
    for t in list(base.parameters()) + list(base.buffers()):  # every other tensor is shared, not copied
        memo.setdefault(id(t), t)
    return copy.deepcopy(base, memo)
