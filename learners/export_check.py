"""Does llama.cpp run an exported file as transformers runs the generation it came from?

:func:`compare` loads the GGUF file in llama.cpp itself (llama-cpp-python) and the Hugging Face
directory in transformers (fp32), and on the same texts measures: whether llama.cpp's tokens equal
the tokenizer's, both perplexities, and on how many positions their greedy next token agrees. The
tests and ``bench/edge.py`` judge exports by it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass
class Agreement:
    texts: int
    tokens: int  # positions scored (next-token predictions)
    tokens_equal: bool  # llama.cpp tokenized every text exactly as the Hugging Face tokenizer did
    ppl_reference: float  # transformers, fp32
    ppl_gguf: float  # llama.cpp, the exported file
    top1_agreement: float  # share of positions whose argmax agrees
    max_logit_diff: float

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_gguf / self.ppl_reference

    def to_json(self) -> dict:
        return {**asdict(self), "ppl_ratio": self.ppl_ratio}


def load_llama(path: str | Path, n_ctx: int = 512, n_threads: int = 2, logits_all: bool = True):
    """A llama.cpp model on ``path`` (CPU, quiet)."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           logits_all=logits_all, verbose=False)


def llama_logits(llm, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for ``ids`` from an empty context."""
    llm.reset()
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of each next token (float64)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logz = np.log(np.exp(x).sum(-1))
    return logz - x[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def compare(gguf_path: str | Path, model_dir: str | Path, texts: Sequence[str], max_tokens: int = 256,
            n_threads: int = 2) -> Agreement:
    """Score ``texts`` (each cut to ``max_tokens`` tokens) with the exported file and with the generation."""
    from learners._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    llm = load_llama(gguf_path, n_ctx=max_tokens, n_threads=n_threads)
    try:
        equal, n, agree, diff = True, 0, 0, 0.0
        nll_ref, nll_gguf = 0.0, 0.0
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            equal &= llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids
            ids = ids[:max_tokens]
            if len(ids) < 2:
                continue
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].float().numpy()
            got = llama_logits(llm, ids)
            nll_ref += float(_nll(ref, ids).sum())
            nll_gguf += float(_nll(got, ids).sum())
            agree += int((ref[:-1].argmax(-1) == got[:-1].argmax(-1)).sum())
            diff = max(diff, float(np.abs(ref - got).max()))
            n += len(ids) - 1
    finally:
        llm.close()
    if n == 0:
        raise ValueError("no text of at least two tokens to score")
    return Agreement(len(texts), n, bool(equal), math.exp(nll_ref / n), math.exp(nll_gguf / n), agree / n, diff)
