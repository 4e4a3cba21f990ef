"""Export a generation as one GGUF file that llama.cpp (llama-cpp-python, ollama, LM Studio) runs as it is.

Plain code over a saved Hugging Face directory (any generation the daemon makes: pruned MLP widths,
fewer key/value groups, fewer blocks, a trimmed vocabulary), written with ``gguf`` (gguf-py,
llama.cpp's own writer) the way llama.cpp's ``convert_hf_to_gguf.py`` writes a Llama:

* tensors renamed to llama.cpp's (``blk.N.attn_q.weight`` ...), the query and key projections
  permuted from Hugging Face's rotary layout back to llama.cpp's (``_permute``), norms in F32, a tied
  output head left out (llama.cpp reuses ``token_embd``);
* ``head_dim`` written as the key/value length and rotary dimension, since after pruning heads it is no
  longer ``hidden / heads``;
* the generation's own tokenizer: byte-level BPE tokens in id order, merges, token types (added
  special tokens are CONTROL), bos/eos/unk/pad ids, whether a BOS is added, the chat template, and the
  pre-tokenizer llama.cpp must use to split text exactly as the tokenizer does (``_pre_tokenizer``).

Quantized types work on blocks of 32 values along each row. A tensor whose rows are not a whole
number of blocks (a pruned MLP width such as 1328 makes ``ffn_down``'s rows 1328 long) cannot be
quantized; it falls back to F16, as llama.cpp's converter does, and the fallback is recorded in the
export record (``ExportRecord.fallback``). The file is written to a temporary name beside the target
and renamed into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

FORMATS = ("gguf",)
# Exported type -> (tensor type for the weight matrices, file type recorded in the header).
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
FALLBACK = "F16"  # holds any row length, and what llama.cpp's converter falls back to

_LAYER = re.compile(r"\Amodel\.layers\.(\d+)\.(.+)\Z")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


class ExportError(ValueError):
    """The generation cannot be exported as asked; the message is one sentence for the operator."""


@dataclass
class ExportRecord:
    """One exported file, as the card's ``exports`` lists it (``path`` relative to the generation)."""

    format: str
    type: str
    path: str
    bytes: int
    sha256: str
    fallback: dict[str, str] = field(default_factory=dict)  # tensor -> the type it was written in instead

    def to_json(self) -> dict:
        return asdict(self)


def parse_targets(spec: str | None) -> list[tuple[str, str]]:
    """``"gguf:q8_0,gguf:f16"`` -> ``[("gguf", "q8_0"), ("gguf", "f16")]`` (``CASCADE_EXPORT``);
    raises ValueError naming what is wrong."""
    out: list[tuple[str, str]] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        fmt, _, typ = part.partition(":")
        fmt, typ = fmt.strip().lower(), (typ.strip().lower() or "q8_0")
        if fmt not in FORMATS:
            raise ValueError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
        if typ not in TYPES:
            raise ValueError(f"unknown {fmt} type {typ!r} (known: {', '.join(TYPES)})")
        if (fmt, typ) not in out:
            out.append((fmt, typ))
    return out


def file_name(lineage: str, generation: str, typ: str) -> str:
    return f"{lineage}-{generation}.{typ}.gguf"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head; as
    ``LlamaModel.permute`` in llama.cpp's converter."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level(p: dict) -> bool:
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)


def _pre_tokenizer(spec: dict) -> str:
    """The name of llama.cpp's pre-tokenizer that splits text as this tokenizer.json does.

    A plain byte-level pre-tokenizer is GPT-2's regex ("gpt-2"); digits split one by one before it is
    SmolLM's ("smollm"). Others are refused rather than guessed: a wrong choice tokenizes differently.
    """
    if spec.get("normalizer"):
        raise ExportError(f"the tokenizer's normalizer {spec['normalizer'].get('type')} has no llama.cpp equivalent here")
    pre = spec.get("pre_tokenizer") or {}
    if _byte_level(pre):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits") and _byte_level(parts[1])):
        return "smollm"
    raise ExportError(f"no llama.cpp pre-tokenizer is known to match this tokenizer's {json.dumps(pre)[:200]}")


def _load_tokenizer(model_dir: Path):
    from learners._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def _add_tokenizer(w, model_dir: Path, n_vocab: int) -> None:
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json (only byte-level BPE tokenizers are exported)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"the tokenizer is {model.get('type')}, not a byte-level BPE llama.cpp reads as gpt2")
    pre = _pre_tokenizer(spec)
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = (added["content"],
                              gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has token id {max(by_id)} but the model only {n_vocab} embeddings")
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in tokens])
    w.add_token_types([k for _, k in tokens])
    w.add_token_merges(merges)

    tok = _load_tokenizer(model_dir)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        token_id = getattr(tok, f"{key}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            add(token_id)
    probe = "a"
    with_special = tok(probe)["input_ids"]
    plain = tok(probe, add_special_tokens=False)["input_ids"]
    w.add_add_bos_token(tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id] != plain[:1])
    w.add_add_eos_token(tok.eos_token_id is not None and with_special[-1:] == [tok.eos_token_id] != plain[-1:])
    w.add_add_space_prefix(False)
    if isinstance(tok.chat_template, str) and tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{model_dir} is not a model directory (no config.json)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise ExportError(f"only Llama models are exported (this one is {cfg.get('model_type')!r})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ExportError("only Llama models without biases and with SiLU MLPs are exported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not exported")
    return cfg


def _tensors(model_dir: Path):
    """(name, float32 numpy array) for every tensor of the checkpoint's safetensors files."""
    import torch
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no .safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                yield name, sf.get_tensor(name).to(torch.float32).numpy()


def _encode(name: str, data: np.ndarray, qtype):
    """The tensor in ``qtype`` (norms and vectors in F32), or in F16 where its rows do not quantize."""
    import gguf

    F = gguf.GGMLQuantizationType
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return data.astype(np.float32), F.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        fallback = F[FALLBACK]
        return gguf.quants.quantize(data, fallback), fallback


def export_gguf(model_dir: str | Path, out: str | Path, typ: str = "q8_0", name: str | None = None) -> ExportRecord:
    """Write the Hugging Face generation at ``model_dir`` as the GGUF file ``out`` in ``typ``.

    Returns the record of the file (``path`` is ``out`` as given). Raises :class:`ExportError` for
    what cannot be exported (unknown type, unsupported model or tokenizer, unwritable target);
    nothing is left at ``out`` unless the whole file was written.
    """
    import gguf

    model_dir, out = Path(model_dir), Path(out)
    if typ not in TYPES:
        raise ExportError(f"unsupported GGUF type {typ!r} (supported: {', '.join(TYPES)})")
    cfg = _read_config(model_dir)
    tensor_type, file_type = TYPES[typ]
    qtype = gguf.GGMLQuantizationType[tensor_type]
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    tied = bool(cfg.get("tie_word_embeddings", False))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name or model_dir.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(cfg["hidden_size"])
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(cfg["vocab_size"])
        w.add_file_type(gguf.LlamaFileType[file_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(w, model_dir, cfg["vocab_size"])

        fallback: dict[str, str] = {}
        written = set()
        for hf_name, data in _tensors(model_dir):
            if m := _LAYER.match(hf_name):
                block, rest = m.groups()
                if rest not in _LAYER_NAMES:
                    raise ExportError(f"tensor {hf_name} has no place in llama.cpp's Llama")
                gg_name = f"blk.{block}.{_LAYER_NAMES[rest]}"
                if rest == "self_attn.q_proj.weight":
                    data = _permute(data, n_head)
                elif rest == "self_attn.k_proj.weight":
                    data = _permute(data, n_kv)
            elif hf_name in _GLOBAL_NAMES:
                if hf_name == "lm_head.weight" and tied:
                    continue  # llama.cpp uses token_embd for a missing output head
                gg_name = _GLOBAL_NAMES[hf_name]
            else:
                raise ExportError(f"tensor {hf_name} has no place in llama.cpp's Llama")
            encoded, used = _encode(gg_name, data, qtype)
            if used != qtype and data.ndim > 1 and not gg_name.endswith("_norm.weight"):
                fallback[gg_name] = used.name.lower()
            w.add_tensor(gg_name, encoded, raw_dtype=used)
            written.add(gg_name)
        if "token_embd.weight" not in written:
            raise ExportError(f"{model_dir} has no token embedding")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        digest, size = hashlib.sha256(), 0
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportRecord("gguf", typ, str(out), size, digest.hexdigest(), fallback)


def export_generation(gen_dir: str | Path, lineage: str, generation: str,
                      targets: list[tuple[str, str]]) -> tuple[list[ExportRecord], list[str]]:
    """Each of ``targets`` exported into ``<gen_dir>/export/``: the records (``path`` relative to
    ``gen_dir``, as the card lists them) and one sentence per export that failed (the others are
    still made; a failed one leaves no file)."""
    gen_dir = Path(gen_dir)
    records, failures = [], []
    for fmt, typ in targets:
        rel = Path("export") / file_name(lineage, generation, typ)
        try:
            rec = export_gguf(gen_dir, gen_dir / rel, typ, name=f"{lineage}/{generation}")
        except Exception as e:  # noqa: BLE001 - reported, never raised: an export never blocks a promotion
            failures.append(f"{fmt}:{typ}: {e}")
            continue
        rec.path = str(rel)
        records.append(rec)
    return records, failures
