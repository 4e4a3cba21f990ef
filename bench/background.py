"""Learning while a reduction runs beside it, against learning alone: the daemon on SmolLM2-135M.

One daemon at its defaults (no reduction of its own: ``CASCADE_REDUCE_EVERY=0``) learns Python
standard-library sources, published well ahead so that the learner never waits for traffic. It learns
alone for ``--alone-s`` seconds; then it is asked to reduce (``reduce`` on the control stream) and learns
on while the reducer actor works on the snapshot, until the learner adopts the result. The interactions
learned per second in each phase come from the lineage's checkpoints (``live/state.json``, polled): alone,
between two checkpoints ``--alone-s`` apart; during the reduction, from the checkpoint that holds the
snapshot (``reduction_pending``) to the last one before the adoption. Side by side in one run, on one
machine: their ratio, the reduction's wall time (snapshot to adoption) and what the new generation is.

Usage: ``python -m bench.background [--quick] [--alone-s 600]``; writes bench/results/background[-quick].json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import RESULTS, Daemon, foundation, run_line, write_json


def poll(home: Path) -> dict | None:
    try:
        return json.loads((home / "registry/main/live/state.json").read_text())
    except (OSError, ValueError):  # between the checkpoint's rename and its read
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a smoke run: a short alone phase, a small reduction")
    ap.add_argument("--alone-s", type=float, default=600.0, help="seconds of learning alone")
    args = ap.parse_args(argv)
    from daemon.corpus import code_interactions

    alone_s = 60.0 if args.quick else args.alone_s
    settings = {"base_model": foundation(), "reduce_every": 0, "metrics_port": 0}
    if args.quick:
        settings.update(calibration_items=32, heal_steps=2)
    records = [{**r, "id": f"py-{i}"} for i, r in enumerate(code_interactions(400 if args.quick else 1500))]
    daemon = Daemon(RESULTS.parent / ".work" / f"background{'-quick' if args.quick else ''}", settings, "daemon.log")
    home, trace = daemon.home, []

    def sample() -> dict | None:
        s = poll(home)
        if s is not None:
            trace.append({"t": time.monotonic(), "learned": s["interactions_learned"], "step": s["step"],
                          "base": s["base"], "pending": s["reduction_pending"] is not None})
        return s

    try:
        daemon.publish(records)
        t0 = time.monotonic()
        while (s := sample()) is None or s["interactions_learned"] == 0:  # the first window: start-up, warm-up
            if time.monotonic() - t0 > 1800:
                raise TimeoutError("nothing learned in 30 minutes")
            time.sleep(2.0)
        start = trace[-1]
        # at least --alone-s seconds, and at least one more window
        while time.monotonic() - start["t"] < alone_s or trace[-1]["step"] == start["step"]:
            sample()
            time.sleep(2.0)
        alone_end = trace[-1]
        daemon.redis.xadd("cascade:control", {"command": "reduce", "lineage": "main"})
        # until the learner adopted the result (a new base) or dropped it (the snapshot no longer pending)
        while not ((s := sample()) and (s["base"] != start["base"] or (not trace[-1]["pending"] and any(
                x["pending"] for x in trace)))):
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: see {home}")
            time.sleep(2.0)
        remaining = daemon.redis.xlen("cascade:interactions")
    finally:
        daemon.stop()
    during = [x for x in trace if x["pending"] and x["base"] == start["base"]]
    gen = (home / "registry/main/CURRENT").read_text().strip()
    card = json.loads((home / "registry/main" / gen / "card.json").read_text())
    if gen == start["base"]:
        raise RuntimeError(f"the reduction was not promoted (its gate refused every keep): see {home}")

    def rate(a: dict, b: dict) -> dict:
        return {"seconds": b["t"] - a["t"], "learned": b["learned"] - a["learned"],
                "per_second": (b["learned"] - a["learned"]) / (b["t"] - a["t"])}

    # (a reduction shorter than one window, as a smoke run's may be, leaves no rate to measure)
    doc = {"alone": rate(start, alone_end),
           "during_reduction": rate(during[0], during[-1]) if len(during) > 1 else None,
           "reduction_seconds": trace[-1]["t"] - during[0]["t"] if during else None, "generation": gen,
           "n_params": [card["reduction"]["n_params_before"], card["n_params"]],
           "keep_achieved": card["reduction"]["keep_achieved"], "published": len(records), "stream_length": remaining,
           "settings": {k: str(v) for k, v in settings.items()}}
    doc["ratio"] = doc["during_reduction"]["per_second"] / doc["alone"]["per_second"] if len(during) > 1 else None
    write_json(f"background{'-quick' if args.quick else ''}.json", doc)
    print(markdown_table(doc))
    return 0


def markdown_table(doc: dict) -> str:
    a, d = doc["alone"], doc["during_reduction"]
    if d is None:
        return f"Learning alone {a['per_second']:.3f} interactions/s; the reduction ended before a window was " \
               f"learned beside it ({doc['generation']}). {run_line(doc)}"
    return "\n".join([
        "| phase | seconds | interactions learned | per second |", "|---|---|---|---|",
        f"| learning alone | {a['seconds']:.0f} | {a['learned']} | {a['per_second']:.3f} |",
        f"| learning while the reducer works | {d['seconds']:.0f} | {d['learned']} | {d['per_second']:.3f} |",
        "", f"Learning during the reduction: **{doc['ratio']:.2f}x** learning alone; the reduction took "
        f"{doc['reduction_seconds'] / 60:.1f} min from snapshot to adoption ({doc['n_params'][0]:,} -> "
        f"{doc['n_params'][1]:,} parameters, {doc['generation']}).", "", run_line(doc)])


if __name__ == "__main__":
    raise SystemExit(main())
