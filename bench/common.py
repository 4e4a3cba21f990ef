"""Shared pieces of the benchmarks: the cached foundation, a daemon subprocess, waiting, evaluating."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from learners._compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before transformers imports torchvision

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"


def foundation() -> Path:
    """SmolLM2-135M converted once into bench/.cache (reused by every benchmark run)."""
    from daemon.foundation import ensure_foundation
    from daemon.registry import Registry

    d = Registry(CACHE / "registry").lineage("main")
    ensure_foundation(d, None)
    return d.path / "gen-0000"


class Daemon:
    """``cascade run`` as a subprocess on its own CASCADE_HOME with an embedded Redis."""

    def __init__(self, home: Path, settings: dict[str, object], log_name: str) -> None:
        if home.exists():
            shutil.rmtree(home)
        home.mkdir(parents=True)
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
        # The API only where a benchmark asks for it (serve="on"): a replica beside the learner would take
        # cores from what the benchmark measures.
        self.env["CASCADE_SERVE"] = "off"
        self.env.update({f"CASCADE_{k.upper()}": str(v) for k, v in settings.items()})
        self.env["CASCADE_HOME"] = str(home)
        self.log = open(home / log_name, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run"], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.redis = self._connect()

    def _connect(self, timeout: float = 300):
        from daemon.embedded_redis import EmbeddedRedis
        from daemon.stream import connect

        sock = EmbeddedRedis(self.home).socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: see {self.home}")
            if sock.exists() and (self.home / "daemon.pid").exists():
                return connect(f"unix://{sock}")
            time.sleep(0.5)
        raise TimeoutError("daemon did not start")

    def publish(self, records: list[dict], stream: str = "cascade:interactions") -> None:
        pipe = self.redis.pipeline(transaction=False)
        for rec in records:
            fields = {"prompt": rec["prompt"], "response": rec["response"], "meta": json.dumps(rec["meta"])}
            if "id" in rec:
                fields["id"] = rec["id"]
            pipe.xadd(stream, fields)
        pipe.execute()

    def wait_drained(self, timeout: float = 7200) -> None:
        from daemon.stream import group_info

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = group_info(self.redis, "cascade:interactions", "cascade")
            if info.lag == 0 and info.pending == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: see {self.home}")
            time.sleep(1.0)
        raise TimeoutError("stream not drained")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def free_port() -> int:
    """A free loopback port between Ray's worker ports (10002-19999) and the kernel's ephemeral range
    (32768 up), as tests/conftest.py picks them: a port from ``bind(0)`` is one Ray's own processes may
    take at random while the daemon starts."""
    import random
    import socket

    for port in random.sample(range(20000, 32768), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32767")


def live_model(home: Path, lineage: str = "main"):
    """The lineage's live model: its current generation plus the live adapter (if on it)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from daemon.registry import Registry
    from learners.update import load_causal_lm

    d = Registry(home / "registry").lineage(lineage)
    gen = d.current_dir()
    model = load_causal_lm(gen)
    state = d.live_state()
    if state and state.get("base") == d.current():
        model = PeftModel.from_pretrained(model, str(d.live_target()))
    return model.eval(), AutoTokenizer.from_pretrained(str(gen))


def safetensors_bytes(model_dir: Path) -> int:
    """Bytes of a checkpoint's weights on disk."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


PACKAGES = ("torch", "transformers", "peft", "ray", "redis", "pydantic-settings", "fastapi", "numpy", "gguf",
            "llama-cpp-python", "avalanche-lib")


def commit() -> dict:
    """The git commit the code ran at and whether the work tree had uncommitted changes (``dirty``)."""
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT.parent)
        return out.stdout.strip() if out.returncode == 0 else ""

    # bench/results/ is what a run writes: its own output does not make the code dirty.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
    return {"commit": git("rev-parse", "--short=12", "HEAD") or "unknown", "dirty": bool(status)}


def provenance() -> dict:
    """What a result was measured with: commit (and dirty flag), package versions, device, threads."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(p: str) -> str | None:
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {**commit(), "packages": {p: ver(p) for p in PACKAGES}, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_json(name: str, doc: dict) -> Path:
    """``doc`` to bench/results/``name`` with the run's :func:`provenance`. Rows merged in from earlier
    runs carry their own ``commit`` (:func:`commit`), and tables mark it (:func:`commit_marks`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc["provenance"] = provenance()
    p = RESULTS / name
    p.write_text(json.dumps(doc, indent=1) + "\n")
    return p


def run_line(doc: dict) -> str:
    """The line under a table whose rows all come from the one run ``doc`` records."""
    p = doc.get("provenance", {})
    if p.get("recorded") is False:  # an old result, marked afterwards: say so rather than guess its commit
        return f"(one run; its commit was not recorded: at or before {p['stored_in']}, which stored it)"
    return f"(one run: commit {p.get('commit', '?')}{'+dirty' if p.get('dirty') else ''})"


def commit_marks(rows: list[dict]) -> tuple[str, list[str]]:
    """For a table of ``rows`` (each with a ``commit``): one line naming the commit when they share one,
    else a mark per row; rows without a commit are marked ``?`` (measured before commits were recorded)."""
    names = [r.get("commit", "?") + ("+dirty" if r.get("dirty") else "") for r in rows]
    if len(set(names)) == 1:
        return f"(all rows: commit {names[0]})", [""] * len(rows)
    return "(each row: the commit it ran at)", [f" [{n}]" for n in names]


def ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) else float("inf")
