"""A reduction in the background: the snapshot a learner hands the reducer, and the candidate it hands back.

A reduction takes minutes to an hour on a CPU; the lineage goes on learning meanwhile. So it runs on a
*snapshot*, a folder under ``CASCADE_HOME/reductions/<lineage>/<id>/`` that the learner writes between two
windows and nobody changes afterwards:

* ``teacher/``: the generation with the accepted adapter merged in (a standard HF directory, safetensors);
* ``data.json``: the lineage's :class:`learners.reduce.ReductionData` at that moment (calibration, healing
  and vocabulary items, the held-out sets the gate judges on);
* ``snapshot.json``: which lineage, generation, trigger and learner step it was taken at.

:func:`run_reduction` (the reducer actor's one call; plain code, no Ray) reduces the teacher with the
daemon's reducer (:func:`learners.reduce.reduce`) and writes the result beside it as ``candidate/`` (with its
``reduction.json``: the card's record of every choice), or nothing when every keep failed the gate. Only the
learner ever writes the lineage's directory: it adopts the candidate as the next generation
(``LineageWorker.finish_reduction``), relearns on it what it learned since the snapshot, and removes the
folder. Every write here is temp + rename, so a kill at any instant leaves either no snapshot/candidate or
a whole one; a folder whose lineage no longer waits for it is removed at the next snapshot.
"""
from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path

from daemon.config import Settings
from daemon.registry import atomic_write_json, fsync_tree, read_json
from daemon.reports import ReductionReport, Snapshot
from learners.data import Example
from learners.reduce import ReductionData


def reductions_root(settings: Settings, lineage: str) -> Path:
    return settings.home / "reductions" / lineage


def write_snapshot(settings: Settings, lineage: str, teacher, tokenizer, data: ReductionData, *, parent: str,
                   trigger: str, step: int, n_params: int) -> Snapshot:
    """Write a whole snapshot folder (temp + rename) and remove the lineage's older ones."""
    root = reductions_root(settings, lineage)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():  # a lineage waits for one reduction at a time: the older ones were abandoned
        shutil.rmtree(old, ignore_errors=True)
    sid = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    tmp = root / f".tmp-{sid}"
    teacher.save_pretrained(str(tmp / "teacher"), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "teacher"))
    atomic_write_json(tmp / "data.json", {
        "calibration": [e.to_json() for e in data.calibration], "heal": [e.to_json() for e in data.heal],
        "gate": {d: [e.to_json() for e in v] for d, v in data.gate.items()},
        "vocabulary": None if data.vocabulary is None else [e.to_json() for e in data.vocabulary]})
    snap = Snapshot(lineage=lineage, id=sid, path=str(root / sid), parent=parent, trigger=trigger, step=step,
                    n_params=n_params)
    atomic_write_json(tmp / "snapshot.json", snap.__dict__)
    fsync_tree(tmp)
    tmp.rename(root / sid)
    return snap


def read_data(path: Path) -> ReductionData:
    doc = read_json(path / "data.json")
    ex = lambda xs: [Example.from_json(x) for x in xs]  # noqa: E731
    return ReductionData(ex(doc["calibration"]), ex(doc["heal"]), {d: ex(v) for d, v in doc["gate"].items()},
                         vocabulary=None if doc["vocabulary"] is None else ex(doc["vocabulary"]))


def run_reduction(snap: Snapshot, settings: Settings) -> ReductionReport:
    """Reduce the snapshot's teacher on its data with the daemon's policy and switches; write ``candidate/``
    when a keep passes the gate. Outcome ``candidate`` or ``rejected`` (the lineage's files untouched)."""
    from transformers import AutoTokenizer

    from learners.reduce import reduce
    from learners.update import load_causal_lm

    t0 = time.perf_counter()
    path = Path(snap.path)
    teacher = load_causal_lm(path / "teacher").to(settings.resolved_device()).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path / "teacher"))
    out = reduce(teacher, tokenizer, read_data(path), settings.reduction_policy(), settings.reduction_switches(),
                 name=f"lineage {snap.lineage}: ")
    del teacher
    if out.model is None:
        tries = [t.card() for t in out.record.tries]
        return ReductionReport(snap.lineage, "rejected", snap.parent, snap.parent, snap.n_params, snap.n_params,
                               time.perf_counter() - t0, detail=f"gate failed at every keep: {tries}")
    record = out.record.card(snap.trigger, {"rank": settings.lora_rank, "update_steps": snap.step},
                             settings.reduce_keep)
    record["snapshot"] = {"id": snap.id, "learner_step": snap.step}
    tmp = path / ".candidate"
    shutil.rmtree(tmp, ignore_errors=True)
    out.model.save_pretrained(str(tmp), safe_serialization=True)
    out.tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "reduction.json", {
        "reduction": record, "n_params": out.record.n_params_after,
        "evals": {d: {"loss": math.log(p), "perplexity": p} for d, p in out.record.ppl_after.items()}})
    fsync_tree(tmp)
    tmp.rename(path / "candidate")
    return ReductionReport(snap.lineage, "candidate", snap.parent, snap.parent, snap.n_params,
                           out.record.n_params_after, time.perf_counter() - t0)


def read_candidate(snap: Snapshot) -> tuple[Path, dict] | None:
    """The candidate folder and its record, or None when the reducer wrote none."""
    cand = Path(snap.path) / "candidate"
    if not (cand / "reduction.json").is_file():
        return None
    return cand, json.loads((cand / "reduction.json").read_text())
