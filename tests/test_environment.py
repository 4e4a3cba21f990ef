"""The project's own environment, as a user's script meets it: no project import first."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_a_plain_script_imports_transformers_and_peft_and_loads_a_generation(tiny_model, tmp_path):
    # Exactly what a user writes in .venv: nothing of cascade-lm is imported, no PYTHONPATH, another cwd.
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
        import peft

        model = AutoModelForCausalLM.from_pretrained({str(tiny_model)!r})
        tok = AutoTokenizer.from_pretrained({str(tiny_model)!r})
        ids = tok("def add(a, b):", return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert isinstance(model.config, LlamaConfig)
        print("ok", tuple(logits.shape), peft.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok (1, "), out.stdout



def test_every_slow_unit_names_a_test_that_exists():
    """``SLOW_UNITS`` (what ``make test-fast`` leaves out) names tests by module and function: a renamed test
    would silently come back into the fast tier."""
    import ast

    from tests.conftest import ROOT, SLOW_UNITS

    for entry in SLOW_UNITS:
        module, name = entry.split("::")
        tree = ast.parse((ROOT / "tests" / f"{module}.py").read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, entry
