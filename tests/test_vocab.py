"""Vocabulary trimming on a tiny Llama with SmolLM2's real byte-level BPE tokenizer."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners.data import Example, collate
from learners.reduction import count_parameters
from learners.update import evaluate_loss, load_causal_lm
from learners.vocab import kept_token_ids, token_counts, trim_vocabulary

NICHE = [Example(id=str(i), prompt=f"def f{i}(x):", response=f"\n    return x * {i} + len(str(x))\n")
         for i in range(16)]
OTHER = Example(id="o", prompt="Bonjour,", response=" ce paragraphe français n'a rien à voir: ça déborde!")


@pytest.fixture(scope="module")
def trimmed(tiny_model, tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_causal_lm(tiny_model).eval()
    keep = kept_token_ids(tok, token_counts(tok, NICHE))
    small, small_tok = trim_vocabulary(model, tok, keep)
    return model, tok, small.eval(), small_tok, keep


def test_trim_keeps_the_niche_tokenization_and_its_logits(trimmed):
    model, tok, small, small_tok, keep = trimmed
    assert 256 < len(keep) < 2000 and small.config.vocab_size == len(keep) == len(small_tok)
    assert count_parameters(small) < count_parameters(model) - (49152 - 2000) * model.config.hidden_size
    assert small.get_output_embeddings().weight.data_ptr() == small.get_input_embeddings().weight.data_ptr()
    for ex in NICHE[:4]:
        old, new = (t(ex.prompt + ex.response, add_special_tokens=False)["input_ids"] for t in (tok, small_tok))
        assert [keep[i] for i in new] == old
    assert small_tok.eos_token_id == keep.index(tok.eos_token_id)
    b_old, b_new = collate(tok, NICHE[:4], 32), collate(small_tok, NICHE[:4], 32)
    with torch.no_grad():
        want = model(input_ids=b_old.input_ids, attention_mask=b_old.attention_mask).logits[..., keep]
        got = small(input_ids=b_new.input_ids, attention_mask=b_new.attention_mask).logits
    assert torch.allclose(got, want, atol=1e-5)
    # The same text and scores, with no probability spent on removed tokens: loss per byte can only fall.
    assert (evaluate_loss(small, small_tok, NICHE, 32, per_byte=True)
            < evaluate_loss(model, tok, NICHE, 32, per_byte=True))


def test_text_outside_the_niche_still_round_trips_in_shorter_tokens(trimmed):
    _, tok, small, small_tok, _ = trimmed
    text = OTHER.prompt + OTHER.response
    old, new = (t(text, add_special_tokens=False)["input_ids"] for t in (tok, small_tok))
    assert len(new) > len(old) and max(new) < len(small_tok)
    assert small_tok.decode(new) == text
    loss = evaluate_loss(small, small_tok, [OTHER], 64, per_byte=True)
    assert 0 < loss < float("inf")


def test_trimmed_generation_reloads_from_disk(trimmed, tmp_path):
    _, _, small, small_tok, _ = trimmed
    small.save_pretrained(str(tmp_path), safe_serialization=True)
    small_tok.save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert model.config.vocab_size == len(tok) == small.config.vocab_size
    b = collate(tok, NICHE[:2], 32)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=b.input_ids).logits, small(input_ids=b.input_ids).logits, atol=1e-6)


def test_only_byte_level_bpe_is_trimmed():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="byte-level BPE"):
        kept_token_ids(PreTrainedTokenizerFast(tokenizer_object=words), [0])
