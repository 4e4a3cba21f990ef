"""The project's own environment, as a user's script meets it: no project import first."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def reduced_generation(tiny_model, dest):
    """A generation of every shape a reduction makes: a narrower MLP, fewer key/value groups and blocks, and
    a trimmed vocabulary."""
    from transformers import AutoTokenizer

    from learners.data import Example
    from learners.reduction import magnitude_importance, prune
    from learners.update import load_causal_lm
    from learners.vocab import kept_token_ids, token_counts, trim_vocabulary

    model, tok = load_causal_lm(tiny_model).eval(), AutoTokenizer.from_pretrained(str(tiny_model))
    small = prune(model, magnitude_importance(model), 64, kv_heads=1, layers=1)
    text = [Example(id=str(i), prompt=f"def add{i}(a, b):", response=f" return a + b + {i}") for i in range(8)]
    small, small_tok = trim_vocabulary(small, tok, kept_token_ids(tok, token_counts(tok, text)))
    small.save_pretrained(str(dest), safe_serialization=True)
    small_tok.save_pretrained(str(dest))
    return dest


def test_a_plain_script_imports_transformers_and_peft_and_loads_a_generation(tiny_model, tmp_path):
    # Exactly what a user writes in .venv: nothing of cascade-lm is imported, no PYTHONPATH, another cwd;
    # the foundation's shape and a reduced generation's alike.
    reduced = reduced_generation(tiny_model, tmp_path / "gen-0001")
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
        import peft

        for path in ({str(tiny_model)!r}, {str(reduced)!r}):
            model = AutoModelForCausalLM.from_pretrained(path)
            tok = AutoTokenizer.from_pretrained(path)
            ids = tok("def add(a, b):", return_tensors="pt").input_ids
            with torch.no_grad():
                logits = model(input_ids=ids).logits
            assert isinstance(model.config, LlamaConfig) and logits.shape[-1] == len(tok)
            print("ok", tuple(logits.shape), model.config.num_hidden_layers, model.config.num_key_value_heads)
        print(peft.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, second = out.stdout.splitlines()[:2]
    assert first.startswith("ok (1, ") and first.endswith(" 2 2"), out.stdout  # the tiny Llama: 2 blocks, 2 groups
    assert second.startswith("ok (1, ") and second.endswith(" 1 1"), out.stdout  # reduced to 1 and 1



def test_every_slow_unit_names_a_test_that_exists():
    """``SLOW_UNITS`` (what ``make test-fast`` leaves out) names tests by module and function: a renamed test
    would silently come back into the fast tier."""
    import ast

    from tests.conftest import ROOT, SLOW_UNITS

    for entry in SLOW_UNITS:
        module, name = entry.split("::")
        tree = ast.parse((ROOT / "tests" / f"{module}.py").read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, entry
