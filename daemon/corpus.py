"""Real text found on this machine, turned into interactions (for the demo and the benchmarks)."""
from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Iterator


def python_sources(limit_files: int = 400, seed: int = 0) -> list[Path]:
    """Python standard-library source files (no tests, no site-packages), in a fixed shuffled order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                   and "idlelib" not in p.parts and p.stat().st_size > 2000)
    random.Random(seed).shuffle(files)
    return files[:limit_files]


def code_interactions(files: list[Path], chars: int = 360, per_file: int = 4, domain: str = "python") -> Iterator[dict]:
    """Records ``{"prompt", "response", "meta"}``: the prompt names the file and gives the lines
    before, the response is the next chunk of the file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = f.relative_to(root).as_posix()
        start = min(len(text) // 5, 2000)
        for k in range(per_file):
            a = start + k * chars * 2
            body = text[a : a + chars]
            if len(body) < chars // 2:
                break
            context = text[max(0, a - 200) : a]
            yield {"prompt": f"# {rel}\n{context}", "response": body, "meta": {"domain": domain, "file": rel}}
