"""Phased fine-tuning: a per-lineage schedule of phases over the life of one adapter.

A fresh adapter (a new lineage, or the first after a reduction) often does better warmed up
gently: fewer modules, more replay, a lower rate, then the full adapter. The schedule is declared
in one setting, ``CASCADE_PHASES``, phases separated by ``;``::

    warmup: steps=40, modules=q_proj+v_proj, lr_scale=0.5, replay_ratio=0.6; full

Each phase has a name and optional keys:

* ``steps``: update steps the phase lasts (every phase but the last needs it; the last runs on);
* ``modules``: the LoRA target modules trained in it, ``+``-separated (others stay frozen), or
  ``all`` (the default);
* ``lr_scale``: multiplies the learning rate (default 1);
* ``replay_ratio``: replaces ``CASCADE_REPLAY_RATIO`` during the phase.

Steps count from the adapter's creation; a phase changes at the first update window that starts
at or after its boundary (a window's steps share one phase). An empty setting is one phase,
``full``, the whole adapter at the set rate.
"""
from __future__ import annotations

from dataclasses import dataclass

from learners.config import LORA_TARGETS

KEYS = ("steps", "modules", "lr_scale", "replay_ratio")


@dataclass(frozen=True)
class Phase:
    name: str
    steps: int | None = None  # None: the last phase, open-ended
    modules: frozenset[str] | None = None  # None: every LoRA target
    lr_scale: float = 1.0
    replay_ratio: float | None = None  # None: the lineage's setting


@dataclass(frozen=True)
class PhaseSchedule:
    phases: tuple[Phase, ...] = (Phase("full"),)

    def at(self, adapter_steps: int) -> tuple[int, Phase]:
        """The phase (and its index) in force after ``adapter_steps`` steps of the current adapter."""
        start = 0
        for i, p in enumerate(self.phases):
            if p.steps is None or adapter_steps < start + p.steps:
                return i, p
            start += p.steps
        return len(self.phases) - 1, self.phases[-1]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.phases]


def parse_phases(text: str) -> PhaseSchedule:
    """The schedule in ``text``; raises ``ValueError`` with a message saying what is wrong."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        return PhaseSchedule()
    phases = []
    for k, part in enumerate(parts):
        name, _, rest = part.partition(":")
        name = name.strip()
        if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 32:
            raise ValueError(f"phase name {name!r} must be 1-32 letters, digits, '-' or '_'")
        if name in (p.name for p in phases):
            raise ValueError(f"phase {name!r} appears twice")
        kw: dict = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or key not in KEYS:
                raise ValueError(f"phase {name!r}: {item!r} is not one of {', '.join(k + '=...' for k in KEYS)}")
            try:
                if key == "steps":
                    kw["steps"] = int(value)
                    if kw["steps"] < 1:
                        raise ValueError
                elif key == "modules":
                    mods = frozenset(m.strip() for m in value.split("+") if m.strip())
                    unknown = sorted(mods - set(LORA_TARGETS) - {"all"})
                    if unknown or not mods:
                        raise ValueError(f"unknown modules {unknown}; use 'all' or some of {'+'.join(LORA_TARGETS)}")
                    kw["modules"] = None if "all" in mods else mods
                elif key == "lr_scale":
                    kw["lr_scale"] = float(value)
                    if not 0 < kw["lr_scale"] <= 100:
                        raise ValueError
                else:
                    kw["replay_ratio"] = float(value)
                    if not 0 <= kw["replay_ratio"] < 1:
                        raise ValueError
            except ValueError as e:
                why = str(e) or "out of range"
                raise ValueError(f"phase {name!r}: bad {key}={value!r} ({why})") from None
        last = k == len(parts) - 1
        if not last and "steps" not in kw:
            raise ValueError(f"phase {name!r} needs steps=N (only the last phase may run on)")
        if last and "steps" in kw:
            raise ValueError(f"phase {name!r} is the last and runs on: it takes no steps=")
        phases.append(Phase(name, **kw))
    return PhaseSchedule(tuple(phases))
