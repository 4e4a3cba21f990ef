"""daemon/serving/batcher.py and models.py without Ray: who is admitted, what decodes beside what, and which
weights answer a name (a tiny Llama, a real registry on disk)."""
from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.registry import Registry, atomic_write_json, generation_card
from daemon.serving.batcher import Batcher, Job, Overloaded
from daemon.serving.models import Loaded, ModelCache, Version
from learners.generate import Sampling
from tests.tiny import build_tiny_llama


def test_a_batch_gathering_is_not_a_queue_and_only_requests_beyond_it_are_refused(tmp_path, tokenizer_dir):
    """With 2 per batch and 2 waiting, four requests sent at once are all taken (two decode, two wait for
    them); a fifth, sent while nothing has finished, is refused; all four taken are answered in full."""
    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=5)
    loaded = Loaded(Version("main", "gen-0000", 0, None), AutoModelForCausalLM.from_pretrained(str(path)).eval(),
                    AutoTokenizer.from_pretrained(str(path)))

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch=2, max_queue=2)
        jobs = [Job(loaded, [1, 400 + i], Sampling(max_tokens=200), ["\x01"], loop) for i in range(5)]
        for job in jobs[:4]:
            batcher.submit(job)
        refused = False
        try:
            batcher.submit(jobs[4])
        except Overloaded:
            refused = True
        finishes = []
        for job in jobs[:4]:
            while (event := await asyncio.wait_for(job.events.get(), 120))[0] != "done":
                pass
            finishes.append(event[1])
        return refused, finishes, [len(j.tokens) for j in jobs[:4]]

    refused, finishes, lengths = asyncio.run(main())
    assert refused and finishes == ["length"] * 4 and lengths == [200] * 4


def test_a_new_versions_batch_starts_beside_the_old_one_instead_of_after_it(tmp_path, tokenizer_dir):
    """A request for a new version (a checkpoint that just became durable) gets its answer while the old
    version's long batch is still decoding; both answers are whole and each batch kept its own weights."""
    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=6)
    tok = AutoTokenizer.from_pretrained(str(path))
    old = Loaded(Version("main", "gen-0000", 1, None), AutoModelForCausalLM.from_pretrained(str(path)).eval(), tok)
    new_model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        new_model.lm_head.weight.mul_(-1.0)  # other weights: other greedy answers
    new = Loaded(Version("main", "gen-0000", 2, None), new_model, tok)

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch=4, max_queue=4)
        long = Job(old, [1, 400], Sampling(max_tokens=300), ["\x01"], loop)
        batcher.submit(long)
        while not long.tokens:  # the old batch is decoding
            await asyncio.sleep(0.01)
        short = Job(new, [1, 400], Sampling(max_tokens=5), ["\x01"], loop)
        batcher.submit(short)
        while (await asyncio.wait_for(short.events.get(), 120))[0] != "done":
            pass
        old_tokens_when_new_done = len(long.tokens)
        while (await asyncio.wait_for(long.events.get(), 120))[0] != "done":
            pass
        return old_tokens_when_new_done, long, short

    at, long, short = asyncio.run(main())
    assert at < 300 and len(long.tokens) == 300 and len(short.tokens) == 5
    for job, model in ((long, old.model), (short, new_model)):
        ref = model.generate(torch.tensor([[1, 400]]), max_new_tokens=len(job.tokens), do_sample=False,
                             pad_token_id=2)
        assert job.tokens == ref[0, 2:].tolist()


def test_a_request_joins_its_versions_running_batch_instead_of_waiting_for_it(tmp_path, tokenizer_dir):
    """Continuous batching: a request for the version that is decoding a long answer starts at the next step
    and finishes while the long one still decodes; both answers are generate's own."""
    path = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=9)
    tok = AutoTokenizer.from_pretrained(str(path))
    loaded = Loaded(Version("main", "gen-0000", 1, None), AutoModelForCausalLM.from_pretrained(str(path)).eval(), tok)
    sizes = []

    async def main():
        loop = asyncio.get_running_loop()
        batcher = Batcher(max_batch=4, max_queue=0, on_batch=sizes.append)  # nothing may wait: it must join
        long = Job(loaded, [1, 400], Sampling(max_tokens=300), ["\x01"], loop)
        batcher.submit(long)
        while len(long.tokens) < 5:
            await asyncio.sleep(0.01)
        short = Job(loaded, [1, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59], Sampling(max_tokens=6), ["\x01"], loop)
        batcher.submit(short)
        while (await asyncio.wait_for(short.events.get(), 120))[0] != "done":
            pass
        at = len(long.tokens)
        while (await asyncio.wait_for(long.events.get(), 120))[0] != "done":
            pass
        return at, long, short

    at, long, short = asyncio.run(main())
    assert at < 300 and len(long.tokens) == 300 and len(short.tokens) == 6 and sizes == [1, 2]
    for job in (long, short):
        p = job.prompt_ids
        ref = loaded.model.generate(torch.tensor([p]), max_new_tokens=len(job.tokens), do_sample=False, pad_token_id=2)
        assert job.tokens == ref[0, len(p):].tolist()


def make_lineage(tmp_path, tokenizer_dir):
    registry = Registry(tmp_path / "registry")
    d = registry.lineage("main")
    staging = d.staging_dir()
    model_dir = build_tiny_llama(tmp_path / "m", tokenizer_dir, seed=7)
    for f in model_dir.iterdir():
        shutil.copy(f, staging / f.name)
    d.publish_generation(staging, "gen-0000", generation_card("main", 0, None, 1))
    d.set_current("gen-0000")
    return registry, d, model_dir


def publish_checkpoint(d, model_dir, step: int) -> None:
    from peft import LoraConfig, get_peft_model

    from learners.config import LORA_TARGETS

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False))
    ckpt = d.new_checkpoint_dir(step)
    model.save_pretrained(str(ckpt))
    atomic_write_json(ckpt / "state.json", {"lineage": "main", "base": "gen-0000", "step": step})
    d.publish_live(ckpt)


def test_a_followed_lineage_is_loaded_when_its_checkpoint_becomes_durable_not_when_asked(tmp_path, tokenizer_dir):
    registry, d, model_dir = make_lineage(tmp_path, tokenizer_dir)
    cache = ModelCache(registry, capacity=2)
    assert cache.get("main").version.step == 0
    assert cache.preload() == []  # nobody follows "main" yet
    cache.note("main")
    cache.note("main/gen-0000")  # a generation never changes: not followed
    assert cache.preload() == []  # nothing new
    publish_checkpoint(d, model_dir, 5)
    loaded = cache.preload()
    assert [(v.generation, v.step) for v in loaded] == [("gen-0000", 5)]
    got = cache.get("main")  # served from what the preload loaded: the same module, no second load
    assert got.version.step == 5 and got is cache.get("main")
    base = cache.get("main/gen-0000")
    ids = torch.tensor([[1, 400, 500]])
    with torch.no_grad():  # the adapter (non-zero B) really is merged into the live model, not the generation
        assert not torch.allclose(got.model(ids).logits, base.model(ids).logits)


def test_a_merged_version_has_peft_s_weights_and_leaves_its_generation_untouched(tmp_path, tokenizer_dir):
    """``merged_copy`` (what a swap runs) gives the weights PEFT's own merge gives, writes nothing of the
    generation (a request decoding on it is undisturbed), shares the tensors the adapter does not touch, and
    refuses an adapter whose formula it does not implement, naming the field."""
    import copy
    import json

    from peft import PeftModel

    from learners.merge import merged_copy

    registry, d, model_dir = make_lineage(tmp_path, tokenizer_dir)
    publish_checkpoint(d, model_dir, 3)
    adapter = d.live_target()
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merged_copy(base, adapter)
    reference = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).merge_and_unload()
    ids = torch.tensor([[1, 400, 500, 600]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, reference(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-3)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
    assert merged.model.embed_tokens.weight is base.model.embed_tokens.weight
    assert merged.model.layers[0].mlp.down_proj.weight is not base.model.layers[0].mlp.down_proj.weight

    config = json.loads((adapter / "adapter_config.json").read_text())
    odd = tmp_path / "dora"
    shutil.copytree(adapter, odd)
    (odd / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        merged_copy(base, odd)
