"""Seconds per phase of a piece of work, for the reports that say where a window's time goes.

``Timings`` is a plain ``dict[str, float]`` of accumulated wall-clock seconds; ``with t("forward"):``
adds the block's time to ``t["forward"]``. On a CPU the figures are the phases' own; on a GPU a phase
that launches kernels without waiting for them shows less than it costs and the next phase that waits
(a ``.item()``, a copy to the host) shows the rest.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Mapping


class Timings(dict[str, float]):
    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - t0

    def add(self, other: Mapping[str, float], prefix: str = "") -> None:
        """Accumulate ``other``'s phases, named ``prefix + phase``."""
        for k, v in other.items():
            self[prefix + k] = self.get(prefix + k, 0.0) + v
