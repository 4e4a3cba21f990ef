"""GGUF export, judged in llama.cpp itself: the tiny Llama (trained a little on real text, so that its
predictions mean something) and a pruned, vocabulary-trimmed generation of it."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.registry import generation_card
from learners.data import Example
from learners.export import ExportError, export_generation, export_gguf, parse_targets
from learners.export_check import compare, load_llama
from learners.reduction import activation_importance, prune
from learners.vocab import kept_token_ids, token_counts, trim_vocabulary
from tests.conftest import ROOT

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _chunks(text: str, size: int = 600) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text) - size, size)]


TRAIN = _chunks((STDLIB / "json" / "decoder.py").read_text() + (STDLIB / "json" / "encoder.py").read_text())
# Held out: other files, with digits, runs of spaces, tabs and a trailing newline.
HELDOUT = _chunks((STDLIB / "textwrap.py").read_text())[:6] + [
    "x = 12345 + 0.5\t# 2024-12-01\n\n    indented   spaced\n", "Bonjour, ça déborde! €100\n"]


def _train(model_dir: Path, out: Path, steps: int = 60) -> Path:
    """A few Adam steps on ``TRAIN`` so that the tiny model's logits are peaked, as a real model's are."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(TRAIN), (4,), generator=g).tolist()
        batch = tok([TRAIN[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=96)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory) -> Path:
    return _train(tiny_model, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def reduced(trained, tmp_path_factory) -> Path:
    """The trained tiny Llama with an MLP of 72 neurons (not a multiple of 32), one KV group of two
    (head_dim 16, no longer hidden / heads), one block and a vocabulary trimmed to its training text."""
    tok = AutoTokenizer.from_pretrained(str(trained))
    model = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32).eval()
    examples = [Example(id=str(i), prompt="", response=t) for i, t in enumerate(TRAIN)]
    importance = activation_importance(model, examples[:16], tok, 96)
    small = prune(model, importance, 72, kv_heads=1, layers=1)
    small, small_tok = trim_vocabulary(small, tok, kept_token_ids(tok, token_counts(tok, examples)))
    out = tmp_path_factory.mktemp("reduced")
    small.save_pretrained(str(out), safe_serialization=True)
    small_tok.save_pretrained(str(out))
    return out


def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("which", ["trained", "reduced"])
def test_llama_cpp_runs_the_export_as_transformers_runs_the_generation(which, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    for typ, ppl_tol, top1 in (("f16", 0.01, 0.99), ("q8_0", 0.03, 0.95)):
        rec = export_gguf(model_dir, tmp_path / f"{which}.{typ}.gguf", typ)
        a = compare(rec.path, model_dir, HELDOUT, max_tokens=128)
        assert a.tokens_equal, f"{which} {typ}: llama.cpp tokenized differently"
        assert a.tokens > 500
        if which == "trained":  # the training made it predict: far better than chance over 49k tokens
            assert a.ppl_reference < 49152 / 4
        assert abs(a.ppl_ratio - 1) < ppl_tol, f"{which} {typ}: {a}"
        assert a.top1_agreement >= top1, f"{which} {typ}: {a}"


def test_rows_that_do_not_quantize_fall_back_to_f16_and_are_recorded(reduced, tmp_path):
    rec = export_gguf(reduced, tmp_path / "r.q8_0.gguf", "q8_0")
    types = _types(tmp_path / "r.q8_0.gguf")
    assert rec.fallback == {"blk.0.ffn_down.weight": "f16"}  # its rows are 72 long
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_gate.weight"] == types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied: llama.cpp reuses the embedding
    assert rec.bytes == (tmp_path / "r.q8_0.gguf").stat().st_size and len(rec.sha256) == 64
    assert export_gguf(reduced, tmp_path / "r.f16.gguf", "f16").fallback == {}


def test_the_file_carries_the_generations_shape_and_tokenizer(reduced, tmp_path):
    rec = export_gguf(reduced, tmp_path / "r.f16.gguf", "f16", name="main/gen-0001")
    fields = {k: f.contents() for k, f in GGUFReader(rec.path).fields.items()
              if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    cfg = json.loads((reduced / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(reduced))
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "main/gen-0001"
    assert fields["llama.block_count"] == 1 and fields["llama.feed_forward_length"] == 72
    assert fields["llama.attention.head_count"] == 2 and fields["llama.attention.head_count_kv"] == 1
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 16
    assert fields["llama.vocab_size"] == cfg["vocab_size"] == len(tok) < 5000
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tok.chat_template
    # llama.cpp reads the special tokens and the chat template: the chat format renders as transformers'.
    llm = load_llama(rec.path, n_ctx=64, logits_all=False)
    try:
        assert llm.token_eos() == tok.eos_token_id
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
    finally:
        llm.close()


def test_smollm_pre_tokenizer_splits_digits_as_the_tokenizer_does(trained, tmp_path):
    """A tokenizer that splits digits one by one before the byte-level step (SmolLM2's original) is
    written with llama.cpp's "smollm" pre-tokenizer; llama.cpp then splits numbers the same way."""
    d = tmp_path / "digits"
    d.mkdir()
    for f in trained.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, spec["pre_tokenizer"]]}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    rec = export_gguf(d, tmp_path / "d.f16.gguf", "f16")
    assert GGUFReader(rec.path).fields["tokenizer.ggml.pre"].contents() == "smollm"
    tok = AutoTokenizer.from_pretrained(str(d))
    llm = load_llama(rec.path, n_ctx=64, logits_all=False)
    try:
        for text in ("x = 12345 + 0.5", " 2024-12-01 and 99 bottles", HELDOUT[0]):
            want = tok(text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == want
    finally:
        llm.close()


def test_unsupported_tokenizers_and_types_are_refused_and_leave_nothing(trained, tmp_path):
    with pytest.raises(ExportError, match="unsupported GGUF type"):
        export_gguf(trained, tmp_path / "x.gguf", "q3_k")
    d = tmp_path / "odd"
    d.mkdir()
    for f in trained.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ExportError, match="pre-tokenizer"):
        export_gguf(d, tmp_path / "out" / "x.gguf", "f16")
    assert list((tmp_path / "out").iterdir()) == []  # the temporary file went too


def test_parse_targets():
    assert parse_targets("gguf:q8_0, gguf:f16,gguf:q8_0") == [("gguf", "q8_0"), ("gguf", "f16")]
    assert parse_targets("") == [] and parse_targets(None) == []
    for bad in ("onnx:f16", "gguf:q3"):
        with pytest.raises(ValueError):
            parse_targets(bad)


def test_export_generation_records_paths_relative_to_the_generation(reduced, tmp_path):
    gen = tmp_path / "gen-0001"
    gen.mkdir()
    for f in reduced.iterdir():
        (gen / f.name).write_bytes(f.read_bytes())
    records, failures = export_generation(gen, "main", "gen-0001", [("gguf", "q8_0"), ("gguf", "f16")])
    assert failures == []
    assert [r.path for r in records] == ["export/main-gen-0001.q8_0.gguf", "export/main-gen-0001.f16.gguf"]
    assert all((gen / r.path).stat().st_size == r.bytes for r in records)


# -- the command ----------------------------------------------------------------------------------
@pytest.fixture
def home(trained, tmp_path) -> Path:
    gen = tmp_path / "home" / "registry" / "main" / "gen-0000"
    gen.mkdir(parents=True)
    for f in trained.iterdir():
        (gen / f.name).write_bytes(f.read_bytes())
    (gen / "card.json").write_text(json.dumps(generation_card("main", 0, None, 1)))
    (gen.parent / "CURRENT").write_text("gen-0000\n")
    return tmp_path / "home"


def _cascade(home: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "CASCADE_HOME": str(home), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_export_writes_one_loadable_file(home, tmp_path):
    r = _cascade(home, "export", "main/gen-0000", "--format", "gguf", "--type", "q8_0", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    path = tmp_path / "main-gen-0000.q8_0.gguf"
    assert rec["path"] == "main-gen-0000.q8_0.gguf" and path.stat().st_size == rec["bytes"]
    llm = load_llama(path, n_ctx=32, logits_all=False)
    try:
        assert llm.n_vocab() == 49152
    finally:
        llm.close()
    r = _cascade(home, "export", "main/gen-0000", "--type", "f16", "--out", str(tmp_path / "sub" / "m.gguf"),
                 cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "sub" / "m.gguf").is_file() and "f16" in r.stdout


@pytest.mark.parametrize("args, says", [
    (("main/gen-0007",), "does not exist"),
    (("nope/gen-0000",), "does not exist"),
    (("main/gen-0000", "--type", "q3_k"), "unsupported GGUF type"),
    (("main/gen-0000", "--format", "onnx"), "unsupported export format"),
    (("main/gen-0000", "--out", "{blocker}/x.gguf"), "cannot write"),
])
def test_cli_export_bad_input_is_one_sentence_and_writes_nothing(home, tmp_path, args, says):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory would have to be")
    work = tmp_path / "work"
    work.mkdir()
    r = _cascade(home, "export", *(a.replace("{blocker}", str(blocker)) for a in args), cwd=work)
    assert r.returncode != 0
    assert says in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("cascade: ")
    assert list(work.iterdir()) == [] and blocker.read_text().startswith("a file")
    assert not list((home / "registry").rglob("*.gguf*")) and not list(tmp_path.glob("*.gguf*"))


# -- export on promotion ----------------------------------------------------------------------------
def _promote(home: Path, base: Path, export: str):
    from daemon.config import load_settings
    from daemon.foundation import ensure_foundation
    from daemon.lineage import LineageWorker
    from daemon.registry import Registry
    from daemon.schema import Interaction

    s = load_settings(home=home, base_model=base, max_seq_len=32, heal_steps=1, reduce_budget=10.0,
                      learning_rate=3e-3, export=export)
    ensure_foundation(Registry(s.registry_root).lineage("main"), s.base_model)
    w = LineageWorker(s, "main")
    w.learn([Interaction(entry_id=f"{i}-0", id=str(i), prompt=f"Q{i}", response=f" answer {i % 2}") for i in range(1, 25)])
    rep = w.reduce()
    w.close()
    return rep


def test_each_promoted_generation_is_exported_into_its_directory_before_it_is_published(trained, tmp_path):
    home = tmp_path / "home"
    rep = _promote(home, trained, "gguf:q8_0,gguf:f16")
    assert rep.outcome == "promoted" and rep.export_failures == []
    gen = home / "registry" / "main" / rep.generation
    card = json.loads((gen / "card.json").read_text())
    assert card == rep.card  # what the cascade:generations event is built from
    assert [(e["format"], e["type"], e["path"]) for e in card["exports"]] == [
        ("gguf", "q8_0", f"export/main-{rep.generation}.q8_0.gguf"),
        ("gguf", "f16", f"export/main-{rep.generation}.f16.gguf")]
    import hashlib
    for e in card["exports"]:
        data = (gen / e["path"]).read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"]
    width = json.loads((gen / "config.json").read_text())["intermediate_size"]
    q8 = card["exports"][0]
    assert bool(q8["fallback"]) == (width % 32 != 0) and card["exports"][1]["fallback"] == {}
    a = compare(gen / q8["path"], gen, HELDOUT[:2], max_tokens=64)
    assert a.tokens_equal and abs(a.ppl_ratio - 1) < 0.03


def test_a_failed_export_is_reported_and_the_generation_promoted_without_it(trained, tmp_path):
    """A tokenizer llama.cpp has no pre-tokenizer for: the export fails, the promotion does not."""
    base = tmp_path / "base"
    base.mkdir()
    for f in trained.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Punctuation"}, spec["pre_tokenizer"]]}
    (base / "tokenizer.json").write_text(json.dumps(spec))
    home = tmp_path / "home"
    rep = _promote(home, base, "gguf:q8_0")
    assert rep.outcome == "promoted" and len(rep.export_failures) == 1 and "pre-tokenizer" in rep.export_failures[0]
    gen = home / "registry" / "main" / rep.generation
    assert (home / "registry" / "main" / "CURRENT").read_text().strip() == rep.generation
    assert json.loads((gen / "card.json").read_text())["exports"] == []
    assert not (gen / "export").exists() or not list((gen / "export").iterdir())


def test_a_bad_export_setting_fails_at_start_naming_it(tmp_path):
    from daemon.config import SettingsError, load_settings

    for bad in ("gguf:q3", "onnx:f16"):
        with pytest.raises(SettingsError, match="CASCADE_EXPORT"):
            load_settings(home=tmp_path, export=bad)
    assert load_settings(home=tmp_path, export=" gguf:Q8_0 ,gguf:f16").export_targets() == [
        ("gguf", "q8_0"), ("gguf", "f16")]
