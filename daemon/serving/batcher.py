"""Dynamic batching: a replica's one decode thread takes every request waiting for the same version and decodes
them together (``learners.generate.decode``), streaming each row's text back to its request as it grows.

A batch starts 20 ms after its first request arrives (at once when full); requests that arrive while it
decodes wait for it to finish and go together in the next one (batching at request granularity; a finished row
leaves its batch at once). A batch holds one version only, so no answer mixes two versions' weights; requests
for another version wait their turn, oldest first.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from daemon.serving.models import Loaded
from learners.generate import Sampling, decode

log = logging.getLogger("cascade.serving")
COLLECT_S = 0.02  # how long a batch waits for company before it starts (unless full)


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


class Batcher:
    def __init__(self, max_batch: int, max_queue: int, on_batch=None) -> None:
        self.max_batch, self.max_queue, self.on_batch = max_batch, max_queue, on_batch
        self._waiting: collections.deque[Job] = collections.deque()
        self._decoding = False  # while False, the first max_batch of _waiting are the next batch, not a queue
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
        """Requests waiting for a batch to finish (those gathering for the next batch do not count)."""
        return len(self._waiting) - (0 if self._decoding else min(len(self._waiting), self.max_batch))

    def _take(self) -> list[Job]:
        with self._cv:
            while not self._waiting:
                self._cv.wait()
            deadline = time.monotonic() + COLLECT_S  # requests sent together arrive some ms apart
            while len(self._waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            version = self._waiting[0].loaded.version
            batch, rest = [], collections.deque()
            while self._waiting:
                job = self._waiting.popleft()
                (batch if job.loaded.version == version and len(batch) < self.max_batch else rest).append(job)
            self._waiting = rest
            self._decoding = True
        return [j for j in batch if not j.cancelled]

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                if batch:
                    if self.on_batch:
                        self.on_batch(len(batch))
                    self._decode(batch)
            except Exception as e:  # noqa: BLE001 - the requests fail, the replica keeps serving
                log.exception("decoding a batch of %d failed", len(batch))
                for job in batch:
                    if job.finish is None:
                        job.send("error", f"{type(e).__name__}: {e}")
            finally:
                with self._cv:
                    self._decoding = False

    def _decode(self, batch: list[Job]) -> None:
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

        decode(loaded.model, [j.prompt_ids for j in batch], [j.sampling for j in batch], eos,
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
