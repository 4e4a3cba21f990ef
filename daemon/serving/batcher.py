"""Dynamic batching: a replica's one decode thread takes every request waiting for the same version and decodes
them together (``learners.generate.decode_steps``), streaming each row's text back to its request as it grows.

A batch starts 20 ms after its first request arrives when the thread is idle (at once when full); requests that
arrive while their version's batch decodes wait for it to finish and go together in the next one (batching at
request granularity; a finished row leaves its batch at once). A batch holds one version only, so no answer mixes
two versions' weights. Batches of different versions (a new checkpoint while the old one's batch finishes, or
two lineages) decode side by side, taking one step each in turn: a new version's first token does not wait for
the old version's last.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from daemon.serving.models import Loaded, Version
from learners.generate import Sampling, decode_steps

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
    jobs: list[Job]
    steps: Iterator[None]


class Batcher:
    def __init__(self, max_batch: int, max_queue: int, on_batch=None) -> None:
        self.max_batch, self.max_queue, self.on_batch = max_batch, max_queue, on_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: dict[Version, Batch] = {}  # written by the decode thread, under the lock
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="cascade-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cv:
            if self.queued() >= self.max_queue:
                raise Overloaded(f"{self.queued()} requests already wait for this replica")
            self._waiting.append(job)
            self._cv.notify()

    def queued(self) -> int:
        """Requests waiting for their version's batch to finish; those a new batch takes when it starts (up to
        ``max_batch`` of a version with none decoding) do not count."""
        per_version = collections.Counter(j.loaded.version for j in self._waiting)
        starting = sum(min(n, self.max_batch) for v, n in per_version.items() if v not in self._active)
        return len(self._waiting) - starting

    def _start_batches(self) -> None:
        """Under the lock: a batch for each waiting version with none decoding, oldest request first."""
        rest: collections.deque[Job] = collections.deque()
        new: dict[Version, list[Job]] = {}
        for job in self._waiting:
            v = job.loaded.version
            if job.cancelled:
                continue
            if v not in self._active and (v in new or len(self._active) + len(new) < MAX_VERSIONS) \
                    and len(new.setdefault(v, [])) < self.max_batch:
                new[v].append(job)
            else:
                rest.append(job)
        self._waiting = rest
        for v, jobs in new.items():
            self._active[v] = Batch(jobs, self._steps(jobs))
            if self.on_batch:
                self.on_batch(len(jobs))

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._active:
                    self._cv.wait()
                if not self._active:  # idle: requests sent together arrive some ms apart
                    deadline = time.monotonic() + COLLECT_S
                    while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                        self._cv.wait(left)
                self._start_batches()
                batches = list(self._active.items())
            for version, batch in batches:  # one step of each, in turn
                done = False
                try:
                    next(batch.steps)
                except StopIteration:
                    done = True
                except Exception as e:  # noqa: BLE001 - the requests fail, the replica keeps serving
                    log.exception("decoding a batch of %d failed", len(batch.jobs))
                    for job in batch.jobs:
                        if job.finish is None:
                            job.send("error", f"{type(e).__name__}: {e}")
                    done = True
                if done:
                    with self._cv:
                        del self._active[version]

    def _steps(self, batch: list[Job]) -> Iterator[None]:
        loaded = batch[0].loaded
        tok = loaded.tokenizer
        eos = {t for t in (tok.eos_token_id, getattr(loaded.model.generation_config, "eos_token_id", None))
               if isinstance(t, int)}

        def on_step(step: dict[int, int]) -> set[int]:
            stop = set()
            now = time.monotonic()
            for row, token in step.items():
                job = batch[row]
                if job.first_token_at is None:
                    job.first_token_at = now
                if token in eos:
                    self._finish(job, "stop")
                    continue
                job.tokens.append(token)
                if job.cancelled:
                    stop.add(row)
                    job.finish = "cancelled"
                elif self._advance(job, tok):
                    stop.add(row)
                elif len(job.tokens) >= job.sampling.max_tokens:
                    self._finish(job, "length")
            return stop

        yield from decode_steps(loaded.model, [j.prompt_ids for j in batch], [j.sampling for j in batch], eos,
                                tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0), on_step)
        for job in batch:
            if job.finish is None:  # decode ended the row without a reason of ours (it cannot, but be total)
                self._finish(job, "length")

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
