"""``make bench``: every benchmark in turn (``--quick`` for a smoke run of each)."""
from __future__ import annotations

import sys

from bench import (adaptation, chaos, continual, crash, curation, edge, memory, reduction, serving, specialists,
                   throughput, vocab)


def main(argv: list[str]) -> int:
    quick = ["--quick"] if "--quick" in argv else []
    return (continual.main(quick) or curation.main(quick) or reduction.main(quick) or crash.main(quick)
            or throughput.main(quick) or memory.main(["--steps", "1"] if quick else [])
            or adaptation.main(quick) or specialists.main(quick) or vocab.main(quick) or chaos.main(quick)
            or serving.main(quick) or edge.main(quick))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
