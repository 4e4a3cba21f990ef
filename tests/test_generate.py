"""learners/generate.py: batched decoding (plain torch) against transformers' own generate on the tiny Llama."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learners.generate import Sampling, decode
from tests.tiny import build_tiny_llama


def run(model, prompts, sampling, stop_after=None):
    out = {i: [] for i in range(len(prompts))}

    def on_step(step):
        for row, token in step.items():
            out[row].append(token)
        return {r for r in step if stop_after and len(out[r]) >= stop_after.get(r, 10**9)}

    decode(model, prompts, sampling, eos_ids=set(), pad_id=2, on_step=on_step)
    return out


def test_batched_greedy_decoding_matches_generate_row_by_row(tmp_path, tokenizer_dir):
    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    prompts = [tok("def add(a, b):")["input_ids"], tok("The quick brown fox jumps over")["input_ids"], [1]]
    lengths = [6, 3, 5]
    got = run(model, prompts, [Sampling(max_tokens=n) for n in lengths])
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p]), max_new_tokens=lengths[i], do_sample=False, pad_token_id=2)
        assert got[i] == ref[0, len(p):].tolist()  # left padding and dropped rows change nothing


def test_sampling_follows_its_seed_and_rows_stop_when_told(tmp_path, tokenizer_dir):
    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=4)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    p = [[1, 400, 500]]
    a = run(model, p * 2, [Sampling(8, temperature=1.5, seed=11), Sampling(8, temperature=1.5, seed=12)])
    b = run(model, p, [Sampling(8, temperature=1.5, seed=11)])
    assert a[0] == b[0] and a[0] != a[1]
    stopped = run(model, p * 2, [Sampling(8), Sampling(8)], stop_after={0: 2})
    assert len(stopped[0]) == 2 and len(stopped[1]) == 8



def test_rows_that_join_a_running_batch_decode_as_if_alone(tmp_path, tokenizer_dir):
    """Continuous batching: rows joining between steps, with prompts longer and shorter than what the batch
    has cached, and rows leaving meanwhile, each get generate's own greedy answer."""
    from learners.generate import RunningBatch

    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=8)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    prompts = {"a": tok("def add(a, b):")["input_ids"], "b": [1, 77],
               "c": tok("The quick brown fox jumps over the lazy dog again and again")["input_ids"],
               "d": [1, 300, 301]}
    lengths = {"a": 12, "b": 4, "c": 7, "d": 5}
    out = {k: [] for k in [*prompts, "e"]}

    def on_step(step):
        for k, t in step.items():
            out[k].append(t)
        return set()

    batch = RunningBatch(model, eos_ids=set(), pad_id=2)
    assert batch.can_join
    batch.join(["a"], [prompts["a"]], [Sampling(lengths["a"])])
    for _ in range(3):
        batch.step(on_step)
    batch.join(["b", "c"], [prompts["b"], prompts["c"]], [Sampling(lengths["b"]), Sampling(lengths["c"])])
    left, steps = [], 0
    while len(out["b"]) < lengths["b"]:
        left += batch.step(on_step)[0]
        steps += 1
    assert left == ["b"] and len(batch) == 2
    batch.join(["d"], [prompts["d"]], [Sampling(lengths["d"])])
    while batch.step(on_step)[1]:
        pass
    for k, p in prompts.items():
        ref = model.generate(torch.tensor([p]), max_new_tokens=lengths[k], do_sample=False, pad_token_id=2)
        assert out[k] == ref[0, len(p):].tolist(), k
    batch.join(["e"], [prompts["b"]], [Sampling(4)])  # an emptied batch takes new rows again
    while batch.step(on_step)[1]:
        pass
    assert out["e"] == out["b"] and len(batch) == 0
