"""``make bench``: every benchmark in turn (``--quick`` for a smoke run of each).

Each step is a benchmark module and the arguments that reproduce the table its docs page shows; the
in-process studies behind some pages' extra tables (``bench.continual_sweep`` with its configurations)
are named beside each table, not rerun here. The healing studies (``bench.heal_scaling``) were measured
on a GPU and take many hours on a CPU: their full runs are made only where torch sees a CUDA device
(their smoke runs always).
"""
from __future__ import annotations

import importlib
import sys

# (module, arguments of the full run); --quick replaces the sizes of each with a smoke run's
STEPS: list[tuple[str, list[str]]] = [
    ("continual", []),  # the related suite: man/python/rust/c
    # the unlike suite with the gate judging (10% held out, so that every source holds enough held-out items)
    ("continual", ["--suite", "unlike", "--per-stage", "160", "--heldout-fraction", "0.1",
                   "--configs", "naive,default,joint"]),
    ("continual", ["--suite", "unlike", "--per-stage", "160", "--heldout-fraction", "0.1", "--order", "reverse",
                   "--configs", "naive,default"]),
    ("curation_threshold", []),
    ("curation", []),
    ("reduction", []),
    ("background", []),
    ("plasticity", []),
    ("heal_scaling", []),
    ("heal_scaling", ["--reconstruct", "--pools", "pool", "--steps", "24,96,384,1536,3072",
                      "--out", "heal-scaling-reconstruct.json"]),
    ("crash", []),
    ("throughput", []),
    ("window_profile", []),
    ("memory", []),
    ("adaptation", []),
    ("specialists", []),
    ("vocab", []),
    ("chaos", []),
    ("serving", []),
    ("edge", []),
]

QUICK: dict[str, list[str]] = {"memory": ["--steps", "1"]}  # memory has no --quick: one step is its smoke run
NEEDS_GPU = {"heal_scaling"}  # full runs only where torch sees a CUDA device


def arguments(module: str, args: list[str], quick: bool) -> list[str]:
    """The command line of one step: the full run's, or its smoke run (the suite kept, sizes dropped)."""
    if not quick:
        return args
    if module in QUICK:
        return QUICK[module]
    keep = ["--suite", "unlike"] if "unlike" in args else []
    return ["--quick", *keep]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    import torch

    gpu = torch.cuda.is_available()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for module, args in STEPS:
        line = arguments(module, args, quick)
        if module in NEEDS_GPU and not quick and not gpu:
            print(f"== skipped (no GPU): python -m bench.{module} {' '.join(line)}", flush=True)
            continue
        if (module, tuple(line)) in seen:  # a quick run of two variants is the same smoke run
            continue
        seen.add((module, tuple(line)))
        print(f"== python -m bench.{module} {' '.join(line)}", flush=True)
        rc = importlib.import_module(f"bench.{module}").main(line)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
