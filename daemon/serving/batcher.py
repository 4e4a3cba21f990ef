"""Continuous batching: a replica's one decode thread decodes the requests of each version together
(``learners.generate.RunningBatch``), streaming each row's text back to its request as it grows.

A batch starts 20 ms after its first request arrives when the thread is idle (at once when full). A request that
arrives while its version's batch decodes joins it at the next step, up to ``max_batch`` rows (a finished row
leaves at once and makes room); only requests beyond that wait, and only ``max_queue`` of them. A batch holds one
version only, so no answer mixes two versions' weights. Batches of different versions (a new checkpoint while
the old one's rows finish, or two lineages) decode side by side, taking one step each in turn: a new version's
first token does not wait for the old version's last.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from daemon.serving.models import Loaded, Version
from learners.generate import RunningBatch, Sampling

log = logging.getLogger("cascade.serving")
COLLECT_S = 0.02  # how long a batch waits for company before it starts (unless full, or others decode)
MAX_VERSIONS = 4  # batches (of different versions) decoding side by side; more versions wait their turn


class Overloaded(RuntimeError):
    pass


@dataclass
class Job:
    loaded: Loaded
    prompt_ids: list[int]
    sampling: Sampling
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) ... then ("done", finish_reason)
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the answer already sent
    first_token_at: float | None = None
    finish: str | None = None

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Batch:
    """One version's rows decoding together: its jobs by row key."""
    running: RunningBatch
    jobs: dict[int, Job] = field(default_factory=dict)


class Batcher:
    def __init__(self, max_batch: int, max_queue: int, on_batch=None) -> None:
        self.max_batch, self.max_queue, self.on_batch = max_batch, max_queue, on_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[Version, Batch] = {}  # written by the decode thread, under the lock
        self._keys = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="cascade-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            self._waiting.append(job)
            if (waiting := self.queued()) > self.max_queue:  # this one would have to wait, beyond the bound
                self._waiting.pop()
                raise Overloaded(f"{waiting - 1} requests already wait for this replica")
            self._cv.notify()

    def queued(self) -> int:
        """Requests that the next step cannot take: beyond the room left in their version's batch (``max_batch``
        for a version with none decoding)."""
        per_version = collections.Counter(j.loaded.version for j in self._waiting)
        taken = sum(min(n, self._room(v)) for v, n in per_version.items())
        return len(self._waiting) - taken

    def _room(self, version: Version) -> int:
        batch = self._active.get(version)
        return self.max_batch - (len(batch.jobs) if batch is not None else 0)

    def _take(self) -> dict[Version, list[Job]]:
        """Under the lock: the waiting jobs the next step takes, by version (oldest first): as many as their
        batch has room for, and for a version with no batch only while fewer than MAX_VERSIONS decode."""
        rest: collections.deque[Job] = collections.deque()
        taken: dict[Version, list[Job]] = {}
        for job in self._waiting:
            v = job.loaded.version
            if job.cancelled:
                continue
            fits = v in self._active or v in taken or len(self._active) + len(taken) < MAX_VERSIONS
            batch = self._active.get(v)
            if fits and (v not in self._active or batch.running.can_join) \
                    and len(taken.get(v, [])) < self._room(v):
                taken.setdefault(v, []).append(job)
            else:
                rest.append(job)
        self._waiting = rest
        for v in taken:
            if v not in self._active:
                first = taken[v][0].loaded
                self._active[v] = Batch(RunningBatch(first.model, eos_ids(first), pad_id(first)))
        return taken

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._active:
                    self._cv.wait()
                if not self._active:  # idle: requests sent together arrive some ms apart
                    deadline = time.monotonic() + COLLECT_S
                    while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cv.wait(left)
                taken = self._take()
                batches = list(self._active.items())
            for version, jobs in taken.items():
                self._join(self._active[version], jobs)
            for version, batch in batches:  # one step of each, in turn
                try:
                    gone, going = batch.running.step(lambda step, b=batch: self._on_step(b, step))
                except Exception as e:  # noqa: BLE001 - the requests fail, the replica keeps serving
                    log.exception("decoding a batch of %d failed", len(batch.jobs))
                    for job in batch.jobs.values():
                        if job.finish is None:
                            job.finish = "error"
                            job.send("error", f"{type(e).__name__}: {e}")
                    gone, going = list(batch.jobs), False
                for key in gone:
                    job = batch.jobs.pop(key)
                    if job.finish is None:  # the batch ended the row without a reason of ours (it cannot, but be total)
                        self._finish(job, "length")
                if not going:
                    with self._cv:
                        if not batch.jobs:
                            del self._active[version]

    def _join(self, batch: Batch, jobs: list[Job]) -> None:
        """Prefill ``jobs`` into ``batch``; if that fails, those requests fail and the batch decodes on."""
        keys = list(range(self._keys, self._keys + len(jobs)))
        self._keys += len(jobs)
        try:
            batch.running.join(keys, [j.prompt_ids for j in jobs], [j.sampling for j in jobs])
        except Exception as e:  # noqa: BLE001
            log.exception("starting %d requests failed", len(jobs))
            for job in jobs:
                job.finish = "error"
                job.send("error", f"{type(e).__name__}: {e}")
            return
        batch.jobs.update(zip(keys, jobs))
        if self.on_batch:
            self.on_batch(len(batch.jobs))  # the requests decoding together as these start

    def _on_step(self, batch: Batch, step: dict[int, int]) -> set[int]:
        stop = set()
        now = time.monotonic()
        for key, token in step.items():
            job = batch.jobs[key]
            tok = job.loaded.tokenizer
            if job.first_token_at is None:
                job.first_token_at = now
            if token in batch.running.eos_ids:
                self._finish(job, "stop")
                continue
            job.tokens.append(token)
            if job.cancelled:
                stop.add(key)
                job.finish = "cancelled"
            elif self._advance(job, tok):
                stop.add(key)
            elif len(job.tokens) >= job.sampling.max_tokens:
                self._finish(job, "length")
        return stop
    @staticmethod
    def _advance(job: Job, tok) -> bool:
        """Send the new text that is safe to send; True when a stop string ended the answer."""
        text = tok.decode(job.tokens, skip_special_tokens=True)
        for s in job.stops:
            at = text.find(s, max(0, job.emitted - len(s) + 1))
            if at >= 0:
                if at > job.emitted:
                    job.send("text", text[job.emitted:at])
                job.emitted = at
                job.finish = "stop"
                job.send("done", "stop")
                return True
        # Hold back an incomplete UTF-8 sequence and what could still become a stop string.
        safe = len(text.rstrip("\ufffd")) - max((len(s) - 1 for s in job.stops), default=0)
        if safe > job.emitted:
            job.send("text", text[job.emitted:safe])
            job.emitted = safe
        return False

    @staticmethod
    def _finish(job: Job, reason: str) -> None:
        text = job.loaded.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if len(text) > job.emitted:
            job.send("text", text[job.emitted:])
            job.emitted = len(text)
        job.finish = reason
        job.send("done", reason)


def eos_ids(loaded: Loaded) -> set[int]:
    """The tokens that end an answer: the tokenizer's end of sequence and the generation config's."""
    return {t for t in (loaded.tokenizer.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None))
            if isinstance(t, int)}


def pad_id(loaded: Loaded) -> int:
    tok = loaded.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos_ids(loaded)), 0)
