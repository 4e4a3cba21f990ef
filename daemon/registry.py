"""The on-disk registry: generations, CURRENT, live/ adapters, cards, and the learned-id ledger.

Layout (see CONTRACT.md)::

    registry/<lineage>/gen-NNNN/      standard HF model dir + card.json
    registry/<lineage>/CURRENT        name of the current generation
    registry/<lineage>/live -> .live/step-NNNNNNNN   PEFT adapter + state.json + replay.json + heldout.json
    registry/<lineage>/ledger.sqlite  interaction ids already handled, with the step that handled them

Atomicity: a generation is written to a temporary directory and renamed into place; CURRENT and
every JSON file are written to a temporary file, fsynced, and renamed; ``live`` is a symlink that
is swapped with one ``rename``, so a reader always sees either the previous checkpoint or the new
one whole. The ledger follows the checkpoint: ids are recorded with the step that will contain
them *before* the checkpoint is published, and on load every id recorded with a step newer than
the published one is forgotten (that step never became durable).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

# \A...\Z, not ^...$: "$" also matches before a trailing newline, so "main\n" would pass.
LINEAGE_RE = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,63}\Z")
GEN_RE = re.compile(r"\Agen-([0-9]{4,})\Z")


class RegistryError(RuntimeError):
    pass


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def generation_card(lineage: str, generation: int, parent: str | None, n_params: int, interactions_seen: int = 0,
                    reduction: dict | None = None, eval: dict | None = None, **extra) -> dict:
    """A generation's ``card.json`` (the CONTRACT's fields, then ``extra`` such as ``source``): the one
    place a card is built, for the foundation, a fork and a reduction alike."""
    return {"lineage": lineage, "generation": generation, "parent": parent, "created_at": now_rfc3339(),
            "n_params": n_params, "interactions_seen": interactions_seen, **extra, "reduction": reduction,
            "eval": eval or {}}


def gen_name(n: int) -> str:
    return f"gen-{n:04d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def check_lineage(name: str) -> str:
    if not LINEAGE_RE.match(name or ""):
        raise RegistryError(f"invalid lineage name {name!r}: must match [a-z0-9][a-z0-9_-]{{0,63}}")
    return name


class Ledger:
    """Interaction ids already handled by a lineage, kept in SQLite next to its checkpoints."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, step INTEGER NOT NULL, outcome TEXT)")
        # What curation skipped, with its reason and fields (a bounded number, newest kept): the durable record
        # of a skip, written in the same transaction as its outcome in ``seen``.
        self.db.execute("CREATE TABLE IF NOT EXISTS skipped (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE "
                        "NOT NULL, step INTEGER NOT NULL, reason TEXT NOT NULL, record TEXT NOT NULL)")

    def forget_after(self, step: int) -> int:
        """Drop ids recorded for steps that never became durable; returns how many."""
        self.db.execute("DELETE FROM skipped WHERE step > ?", (step,))
        return self.db.execute("DELETE FROM seen WHERE step > ?", (step,)).rowcount

    def seen(self, ids: Iterable[str]) -> set[str]:
        ids = list(ids)
        out: set[str] = set()
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = "SELECT id FROM seen WHERE id IN (%s)" % ",".join("?" * len(part))
            out.update(r[0] for r in self.db.execute(q, part))
        return out

    def record(self, ids: Iterable[tuple[str, str]], step: int, skipped: Iterable[dict] = (),
               keep_skipped: int = 100_000) -> None:
        """Record ``(id, outcome)`` pairs as handled by checkpoint ``step``, and in the same transaction the
        records of those curation skipped (``id``, ``reason`` and the fields; the newest ``keep_skipped`` kept)."""
        skipped = list(skipped)
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO seen (id, step, outcome) VALUES (?, ?, ?)",
                            [(i, step, o) for i, o in ids])
        if skipped:
            self.db.executemany("INSERT OR REPLACE INTO skipped (id, step, reason, record) VALUES (?, ?, ?, ?)",
                                [(x["id"], step, x["reason"], json.dumps(x)) for x in skipped])
            self.db.execute("DELETE FROM skipped WHERE n <= (SELECT MAX(n) FROM skipped) - ?", (keep_skipped,))
        self.db.execute("COMMIT")

    def skipped(self, ids: Iterable[str] | None = None, limit: int = 1000) -> list[dict]:
        """Skip records, oldest first: of ``ids``, or the newest ``limit`` of all."""
        if ids is None:
            rows = self.db.execute("SELECT record FROM (SELECT n, record FROM skipped ORDER BY n DESC LIMIT ?) "
                                   "ORDER BY n", (limit,)).fetchall()
            return [json.loads(r[0]) for r in rows]
        ids, out = list(ids), []
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            q = "SELECT record FROM skipped WHERE id IN (%s) ORDER BY n" % ",".join("?" * len(part))
            out += [json.loads(r[0]) for r in self.db.execute(q, part)]
        return out

    def count(self, outcome: str | None = None) -> int:
        if outcome is None:
            return self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM seen WHERE outcome = ?", (outcome,)).fetchone()[0]

    def close(self) -> None:
        self.db.close()


class LineageDir:
    """One lineage's directory. Only its learner writes here; everyone else reads."""

    def __init__(self, root: Path, lineage: str) -> None:
        self.lineage = check_lineage(lineage)
        self.path = root / lineage
        if self.path.resolve().parent != root.resolve():
            raise RegistryError(f"lineage {lineage!r} escapes the registry")

    # -- generations ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return (self.path / "CURRENT").is_file()

    def current(self) -> str:
        try:
            name = (self.path / "CURRENT").read_text().strip()
        except FileNotFoundError:
            raise RegistryError(f"lineage {self.lineage!r} has no generation yet") from None
        if not GEN_RE.match(name) or not (self.path / name).is_dir():
            raise RegistryError(f"lineage {self.lineage!r}: CURRENT names {name!r}, which is not a generation")
        return name

    def current_dir(self) -> Path:
        return self.path / self.current()

    def generations(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if GEN_RE.match(p.name) and (p / "card.json").is_file())

    def card(self, gen: str) -> dict:
        return read_json(self.path / gen / "card.json")

    def next_gen(self) -> str:
        gens = self.generations()
        return gen_name(int(GEN_RE.match(gens[-1]).group(1)) + 1 if gens else 0)

    def staging_dir(self) -> Path:
        """A fresh temporary directory on the same filesystem, for building a generation."""
        self.path.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.path))

    def publish_generation(self, staging: Path, gen: str, card: dict) -> Path:
        """Write the card into ``staging`` and rename it to ``gen`` (does not touch CURRENT)."""
        atomic_write_json(staging / "card.json", card)
        fsync_tree(staging)
        dest = self.path / gen
        if dest.exists():
            raise RegistryError(f"{self.lineage}/{gen} already exists")
        os.rename(staging, dest)
        _fsync_dir(self.path)
        return dest

    def set_current(self, gen: str) -> None:
        if not (self.path / gen / "card.json").is_file():
            raise RegistryError(f"cannot make {gen} current: it is not a complete generation")
        atomic_write_text(self.path / "CURRENT", gen + "\n")

    def clean_staging(self) -> None:
        """Remove half-built generations and checkpoints left by a crash."""
        if not self.path.is_dir():
            return
        for p in self.path.iterdir():
            if p.name.startswith(".staging-"):
                shutil.rmtree(p, ignore_errors=True)
        live_root = self.path / ".live"
        if live_root.is_dir():
            keep = self.live_target()
            for p in live_root.iterdir():
                if keep is None or p.resolve() != keep.resolve():
                    shutil.rmtree(p, ignore_errors=True)

    # -- live/ ---------------------------------------------------------------------------------
    @property
    def live(self) -> Path:
        return self.path / "live"

    def live_target(self) -> Path | None:
        return self.live.resolve() if self.live.is_symlink() and self.live.exists() else None

    def live_state(self) -> dict | None:
        target = self.live_target()
        if target is None or not (target / "state.json").is_file():
            return None
        return read_json(target / "state.json")

    def new_checkpoint_dir(self, step: int) -> Path:
        root = self.path / ".live"
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"step-{step:08d}-", dir=root))

    def publish_live(self, checkpoint: Path) -> None:
        """Point ``live`` at a fully written checkpoint directory, atomically; drop the old one."""
        fsync_tree(checkpoint)
        old = self.live_target()
        tmp_link = self.path / f".live-link-{os.getpid()}-{time.monotonic_ns()}"
        os.symlink(os.path.relpath(checkpoint, self.path), tmp_link)
        os.replace(tmp_link, self.live)
        _fsync_dir(self.path)
        if old is not None and old != checkpoint.resolve():
            shutil.rmtree(old, ignore_errors=True)

    def ledger(self) -> Ledger:
        self.path.mkdir(parents=True, exist_ok=True)
        return Ledger(self.path / "ledger.sqlite")


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def lineage(self, name: str) -> LineageDir:
        return LineageDir(self.root, name)

    def lineages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if LINEAGE_RE.match(p.name) and (p / "CURRENT").is_file())

    def resolve_generation(self, ref: str) -> Path:
        """``lineage/gen-NNNN`` -> its directory."""
        lineage, _, gen = ref.partition("/")
        if not GEN_RE.match(gen):
            raise RegistryError(f"{ref!r} is not of the form LINEAGE/gen-NNNN")
        d = self.lineage(lineage).path / gen
        if not (d / "card.json").is_file():
            raise RegistryError(f"generation {ref!r} does not exist")
        return d
