"""Vocabulary trimming: drop the tokens a specialization never uses.

SmolLM2's 49,152-token embedding (tied to the output head) is 28M of its 135M parameters and the
head is a fixed cost of every forward, however much of the rest is pruned. A niche uses a small part
of it. :func:`trim_vocabulary` keeps the tokens seen in the lineage's own text (plus every special
token and every single-byte token, so any text can still be written) and returns a smaller model and a
standard byte-level BPE tokenizer that ``AutoTokenizer`` / ``AutoModelForCausalLM`` load as before.

Why the output is exact where it matters: a kept token keeps the merges that build it (the closure
over its merge tree), and a merge is dropped only when its result is dropped, so text whose original
tokens were all kept is split into exactly the same tokens (renumbered), and the model's logits over
the kept tokens are unchanged; only the softmax no longer spends probability on removed tokens. Other
text falls back to shorter tokens, so losses before and after a trim are compared per byte of text
(:func:`learners.update.evaluate_loss` with ``per_byte=True``), not per token.
"""
from __future__ import annotations

import copy
import json
import tempfile
from collections import Counter
from typing import Iterable

import torch
from transformers import AutoTokenizer

from learners.data import Example


def token_counts(tokenizer, examples: Iterable[Example]) -> Counter:
    """How often each token id occurs in the prompts and responses of ``examples``."""
    counts: Counter = Counter()
    for ex in examples:
        for text in (ex.prompt, ex.response):
            if text:
                counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return counts


def _bpe(spec: dict) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise ValueError("vocabulary trimming supports byte-level BPE tokenizers only "
                         f"(this one is {model.get('type')} with {spec.get('pre_tokenizer')})")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def kept_token_ids(tokenizer, used: Iterable[int]) -> list[int]:
    """The ids a trim to ``used`` keeps, ascending: ``used``, every special and single-character
    (byte) token, and every token in the merge tree of a kept one."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, merges = _bpe(spec)
    by_id = {i: t for t, i in vocab.items()}
    parts = {a + b: (a, b) for a, b in merges}
    keep = {by_id[i] for i in used if i in by_id}
    keep |= {t for t in vocab if len(t) == 1}
    stack = list(keep)
    while stack:
        for part in parts.get(stack.pop(), ()):
            if part not in keep:
                keep.add(part)
                stack.append(part)
    ids = {vocab[t] for t in keep} | {a["id"] for a in spec.get("added_tokens", [])}
    return sorted(ids)


def _remap(value, old_to_new: dict[int, int]):
    if isinstance(value, list):
        return [old_to_new[v] for v in value]
    return None if value is None else old_to_new[value]


@torch.no_grad()
def trim_vocabulary(model, tokenizer, keep_ids: list[int]):
    """A copy of ``model`` and ``tokenizer`` with only the tokens ``keep_ids`` (ascending, from
    :func:`kept_token_ids`), renumbered 0..n-1 in their original order."""
    old_to_new = {old: new for new, old in enumerate(keep_ids)}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab, merges = _bpe(spec)
    vocab_new = {t: old_to_new[i] for t, i in vocab.items() if i in old_to_new}
    spec["model"]["vocab"] = vocab_new
    spec["model"]["merges"] = [[a, b] for a, b in merges if a + b in vocab_new]
    for added in spec.get("added_tokens", []):
        added["id"] = old_to_new[added["id"]]
    for special in ((spec.get("post_processor") or {}).get("special_tokens") or {}).values():
        special["ids"] = _remap(special["ids"], old_to_new)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/tokenizer.json", "w") as f:
            json.dump(spec, f, ensure_ascii=False)
        config_path = f"{tmp}/tokenizer_config.json"
        with open(config_path) as f:
            config = json.load(f)
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {str(old_to_new[int(k)]): v
                                              for k, v in config["added_tokens_decoder"].items()}
        with open(config_path, "w") as f:
            json.dump(config, f, ensure_ascii=False)
        small_tok = AutoTokenizer.from_pretrained(tmp)

    small = copy.deepcopy(model)
    index = torch.tensor(keep_ids, device=small.get_input_embeddings().weight.device)
    old_embed = small.get_input_embeddings()
    embed = torch.nn.Embedding(len(keep_ids), old_embed.embedding_dim, dtype=old_embed.weight.dtype,
                               device=old_embed.weight.device)
    embed.weight.copy_(old_embed.weight.index_select(0, index))
    small.set_input_embeddings(embed)
    head = small.get_output_embeddings()
    tied = bool(getattr(small.config, "tie_word_embeddings", False))
    new_head = torch.nn.Linear(head.in_features, len(keep_ids), bias=head.bias is not None,
                               dtype=head.weight.dtype, device=head.weight.device)
    if not tied:
        new_head.weight.copy_(head.weight.index_select(0, index))
    if head.bias is not None:
        new_head.bias.copy_(head.bias.index_select(0, index))
    small.set_output_embeddings(new_head)
    small.config.vocab_size = len(keep_ids)
    for cfg in (small.config, small.generation_config):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(cfg, key, None) is not None:
                setattr(cfg, key, _remap(getattr(cfg, key), old_to_new))
    if tied:
        small.tie_weights()
    return small, small_tok
