"""Security by default, checked on the source and on the settings."""
from __future__ import annotations

import re
from pathlib import Path

from daemon.config import load_settings

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = [r"\btorch\.load\(", r"\bimport pickle\b", r"\bpickle\.loads?\(", r"(?<![\w.])eval\(", r"(?<![\w.])exec\(",
             r"\byaml\.load\(", r"\bmarshal\.loads?\(", r"use_safetensors\s*=\s*False", r"safe_serialization\s*=\s*False"]


def test_no_unpickling_or_code_execution_of_data_in_the_project():
    hits = []
    for sub in ("daemon", "learners", "policies", "bench"):
        for f in (ROOT / sub).rglob("*.py"):
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if any(re.search(p, line) for p in FORBIDDEN):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []


def test_servers_default_to_loopback(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("CASCADE_"):
            monkeypatch.delenv(k)
    s = load_settings()
    assert s.metrics_host == "127.0.0.1" and s.redis_url is None  # embedded Redis: unix socket, no TCP port
