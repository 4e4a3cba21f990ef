"""Security by default, checked on the source, the settings, and hostile names on the filesystem."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import load_settings
from daemon.forking import fork_lineage
from daemon.registry import Registry, RegistryError, check_lineage, generation_card

ROOT = Path(__file__).resolve().parents[1]
UNPICKLERS = r"(c|cloud)?[pP]ickle|dill|shelve|marshal"
FORBIDDEN = [
    r"\btorch\.load\(", rf"\b(import|from)\s+([\w.]*\.)?({UNPICKLERS})\b", rf"\b({UNPICKLERS})\.\w+\(",
    r"\bjoblib\.load\(", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False", r"\byaml\.(unsafe_)?load\(",
    r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"(?<![\w.])compile\(", r"\b__import__\(",
    r"use_safetensors\s*=\s*False", r"safe_serialization\s*=\s*False", r"trust_remote_code\s*=\s*True",
    r"\bos\.(system|popen)\(", r"shell\s*=\s*True",
]


def forbidden(line: str) -> bool:
    return any(re.search(p, line) for p in FORBIDDEN)


def test_the_forbidden_patterns_catch_what_they_are_for():
    for bad in ("torch.load(f)", "import pickle", "from cPickle import loads", "cloudpickle.loads(b)", "import dill",
                "from ray import cloudpickle", "import ray.cloudpickle", "x = eval(s)", "exec(code)",
                "compile(src, 'f', 'exec')", "__import__('os')", "yaml.load(f)", "np.load(f, allow_pickle=True)", "torch.load(f, weights_only=False)",
                "from_pretrained(d, trust_remote_code=True)", "os.system(cmd)", "run(cmd, shell=True)"):
        assert forbidden(bad), bad
    for fine in ("model.eval()", "re.compile(r'x')", "safetensors.torch.load_file(f)", "# nothing is ever unpickled",
                 'UNSAFE = (".pkl", ".pickle")'):
        assert not forbidden(fine), fine


def test_no_unpickling_or_code_execution_of_data_in_the_project():
    hits = []
    for sub in ("daemon", "learners", "policies", "bench"):
        for f in (ROOT / sub).rglob("*.py"):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if forbidden(line):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_servers_default_to_loopback(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("CASCADE_"):
            monkeypatch.delenv(k)
    s = load_settings()
    assert s.metrics_host == "127.0.0.1" and s.redis_url is None  # embedded Redis: unix socket, no TCP port


# -- hostile lineage names never reach the filesystem ---------------------------------------------
HOSTILE_NAMES = ["../x", "..", ".", "a/b", "x\n", "\nx", "", "/tmp/evil", "main/../../x", "x/..", "../../../../tmp/x",
                 "a\\b", "ma\x00in", "Main", "-x", "a" * 65, "\u2025x", "~root", "x\r", "main "]


def tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.fixture
def home_with_a_generation(tmp_path) -> Path:
    """A CASCADE_HOME whose lineage main has a (weightless) gen-0000, enough to fork from."""
    gen = tmp_path / "home/registry/main/gen-0000"
    gen.mkdir(parents=True)
    (gen / "config.json").write_text("{}")
    (gen / "card.json").write_text(json.dumps(generation_card("main", 0, None, 1)))
    (gen.parent / "CURRENT").write_text("gen-0000\n")
    return tmp_path / "home"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_registry_functions_refuse_a_hostile_lineage_name_and_create_nothing(home_with_a_generation, name):
    outside = home_with_a_generation.parent
    before = tree(outside)
    registry = Registry(home_with_a_generation / "registry")
    with pytest.raises(RegistryError):
        check_lineage(name)
    with pytest.raises(RegistryError):
        registry.lineage(name)
    with pytest.raises(RegistryError):
        fork_lineage(registry, "main/gen-0000", name)
    with pytest.raises(RegistryError):
        fork_lineage(registry, f"{name}/gen-0000", "copy")
    with pytest.raises(RegistryError):
        registry.resolve_generation(f"{name}/gen-0000")
    assert tree(outside) == before


@pytest.mark.parametrize("ref", ["main/gen-0000\n", "main/../main/gen-0000", "main/gen-0000/../../x", "main/gen-0",
                                 "main/gen-\u0661\u0662\u0663\u0664", "main/", "main"])
def test_a_hostile_generation_reference_is_refused(home_with_a_generation, ref):
    with pytest.raises(RegistryError):
        Registry(home_with_a_generation / "registry").resolve_generation(ref)


@pytest.mark.parametrize("name", ["../x", "a/b", "x\n", "/tmp/evil", ".."])
def test_the_cli_refuses_a_hostile_lineage_name_and_creates_nothing(home_with_a_generation, name):
    outside = home_with_a_generation.parent
    before = tree(outside)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env.update(CASCADE_HOME=str(home_with_a_generation), CASCADE_REDIS_URL="redis://127.0.0.1:1/0",
               PYTHONPATH=str(ROOT))
    for args in (["fork", "--from", "main/gen-0000", "--to", name], ["fork", "--from", f"{name}/gen-0000", "--to", "copy"],
                 ["reduce", "--lineage", name]):
        out = subprocess.run([sys.executable, "-m", "daemon.cli", *args], env=env, cwd=outside, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("cascade: ") and out.stderr.count("\n") == 1, (args, out.stderr)
        assert "invalid lineage name" in out.stderr or "is not of the form LINEAGE/gen-NNNN" in out.stderr
    assert tree(outside) == before
