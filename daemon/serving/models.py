"""Which weights answer a model name, and a bounded cache of loaded weights keyed by that version.

A name is resolved on every request, from what is durable in the registry at that moment:

* ``<lineage>``: its CURRENT generation plus the ``live`` adapter when the adapter's ``state.json`` names that
  generation as its ``base`` (between a promotion and the new generation's first checkpoint the generation alone
  answers); the version's step is the checkpoint's ``step``.
* ``<lineage>/gen-NNNN``: that generation alone, step 0.

The cache is keyed by :class:`Version` (lineage, generation, step and the checkpoint's directory), never by
name, so a name can never be answered by weights it no longer means: a new checkpoint is a new key. Adapters
are merged into a copy of their generation (``learners.merge.merged_copy``: one module per version, its
adapted weights its own, the generation's other tensors shared and never written), so requests in flight keep
the module they started with even after it leaves the cache. Why not Serve's model
multiplexing: it caches per model *id* and routes by it, which is exactly the stale-weights-under-one-name
trap; resolving to a version first and caching by version is the fix, and a small LRU per replica suffices.

Preloading: a lineage name asked for in the last ``RECENT_S`` is resolved again every ``PRELOAD_S`` by the
replica's preload thread (``preload``), and a new version is loaded then, not when the next request needs it;
a request for the new version that arrives while it loads waits for that one load.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from daemon.registry import GEN_RE, LINEAGE_RE, Registry, RegistryError, read_json

log = logging.getLogger("cascade.serving")


class UnknownModel(LookupError):
    pass


@dataclass(frozen=True)
class Version:
    lineage: str
    generation: str
    step: int
    adapter: Path | None  # the resolved checkpoint directory, or None for the generation alone

    @property
    def fingerprint(self) -> str:
        return f"{self.lineage}/{self.generation}@{self.step}"


def resolve(registry: Registry, name: str) -> Version:
    """The durable version ``name`` means now; :class:`UnknownModel` when it names nothing."""
    lineage, _, gen = name.partition("/")
    if not LINEAGE_RE.match(lineage):
        raise UnknownModel(name)
    d = registry.lineage(lineage)
    if gen:
        if not GEN_RE.match(gen) or not (d.path / gen / "card.json").is_file():
            raise UnknownModel(name)
        return Version(lineage, gen, 0, None)
    try:
        current = d.current()
    except RegistryError:
        raise UnknownModel(name) from None
    target = d.live_target()
    try:
        state = read_json(target / "state.json") if target is not None else None
    except (FileNotFoundError, ValueError):  # the checkpoint was replaced (and removed) while being read
        state = None
    if state is None or state.get("base") != current or not (target / "adapter_config.json").is_file():
        return Version(lineage, current, 0, None)
    return Version(lineage, current, int(state.get("step", 0)), target)


def list_models(registry: Registry) -> list[str]:
    """Every name a request may use: each lineage (its live model), then each of its generations."""
    names = []
    for lineage in registry.lineages():
        names.append(lineage)
        names.extend(f"{lineage}/{g}" for g in registry.lineage(lineage).generations())
    return names


@dataclass
class Loaded:
    version: Version
    model: object  # a torch module in eval mode
    tokenizer: object


PRELOAD_S = 0.25  # how often recently asked lineage names are resolved again
RECENT_S = 600.0  # a lineage name is preloaded for this long after it was last asked for
MAX_RECENT = 64  # names followed at most (the oldest asked is dropped)


class ModelCache:
    """Loaded versions, least recently used evicted beyond ``capacity``; generations (the bases) beyond the
    same bound. ``get`` is thread-safe; one version is loaded once however many requests ask at once."""

    def __init__(self, registry: Registry, capacity: int, device: str = "cpu") -> None:
        self.registry, self.capacity, self.device = registry, capacity, device
        self._versions: collections.OrderedDict[Version, Loaded] = collections.OrderedDict()
        self._bases: collections.OrderedDict[Path, tuple[object, object]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Version, threading.Lock] = {}
        self._asked: collections.OrderedDict[str, float] = collections.OrderedDict()  # lineage name -> last asked

    def get(self, name: str) -> Loaded:
        for attempt in range(3):
            version = resolve(self.registry, name)
            try:
                return self._get(version)
            except (OSError, ValueError):  # a newer checkpoint replaced this one while it loaded: resolve again
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def note(self, name: str) -> None:
        """``name`` was answered: follow it (a lineage's live model; a generation never changes)."""
        if "/" in name:
            return
        with self._lock:
            self._asked[name] = time.monotonic()
            self._asked.move_to_end(name)
            while len(self._asked) > MAX_RECENT:
                self._asked.popitem(last=False)

    def preload(self) -> list[Version]:
        """Load the version each recently asked lineage name means now, where it is not loaded yet."""
        now = time.monotonic()
        with self._lock:
            names = [n for n, t in self._asked.items() if now - t < RECENT_S]
        loaded = []
        for name in names:
            try:
                version = resolve(self.registry, name)
                with self._lock:
                    if version in self._versions:
                        continue
                self._get(version)
                loaded.append(version)
            except (UnknownModel, OSError, ValueError):  # gone or replaced while loading: the next round sees
                continue
        return loaded

    def preload_forever(self) -> None:
        """The replica's preload thread (a daemon thread: it ends with the replica)."""
        while True:
            time.sleep(PRELOAD_S)
            try:
                self.preload()
            except Exception:  # noqa: BLE001 - preloading is an optimisation; requests load what they need
                log.exception("preloading failed")

    def _get(self, version: Version) -> Loaded:
        with self._lock:
            if version in self._versions:
                self._versions.move_to_end(version)
                return self._versions[version]
            gate = self._loading.setdefault(version, threading.Lock())
        with gate:
            with self._lock:
                if version in self._versions:
                    return self._versions[version]
            loaded = self._load(version)
            with self._lock:
                self._versions[version] = loaded
                self._loading.pop(version, None)
                while len(self._versions) > self.capacity:
                    self._versions.popitem(last=False)
            return loaded

    def _base(self, gen_dir: Path):
        from learners.update import load_causal_lm
        from transformers import AutoTokenizer

        with self._lock:
            if gen_dir in self._bases:
                self._bases.move_to_end(gen_dir)
                return self._bases[gen_dir]
        model = load_causal_lm(gen_dir).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(gen_dir))
        with self._lock:
            self._bases[gen_dir] = (model, tokenizer)
            while len(self._bases) > self.capacity:
                self._bases.popitem(last=False)
        return model, tokenizer

    def _load(self, version: Version) -> Loaded:
        base, tokenizer = self._base(self.registry.lineage(version.lineage).path / version.generation)
        if version.adapter is None:
            return Loaded(version, base, tokenizer)
        from learners.merge import merged_copy

        # A newer checkpoint may remove this directory while it loads: the load then fails and ``get``
        # resolves the name again (an open file stays readable, so a load is never torn).
        return Loaded(version, merged_copy(base, version.adapter).eval(), tokenizer)
