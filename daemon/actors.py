"""Thin Ray actors: they own state and lifecycle and call into plain code that runs without Ray.

* ``IngestActor`` reads the interaction and control streams, validates entries, dead-letters bad
  ones, and acknowledges what the driver tells it is durable. It declares no CPU (it waits on I/O).
* ``LearnerActor`` wraps one :class:`daemon.lineage.LineageWorker`. With ``CASCADE_LEARNER_CPUS=N`` it
  declares N CPUs to Ray (which places it where they are free) and runs N torch threads; with the
  default 0 the learners of a node share all its cores and the driver lets one learn at a time.
* ``ReducerActor`` reduces a learner's snapshot (``daemon/snapshots.py``) while that learner goes on
  learning; one for the daemon, made at the first reduction, with half the node's cores as torch threads
  and, where the learners use GPUs, a learner's share of one.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import ray
import redis

from daemon.config import Settings
from daemon.schema import Interaction, Rejection, parse_entry
from daemon.stream import GroupInfo, StreamConsumer, connect


def setup_worker() -> None:
    """Runs first in every Ray worker process (``runtime_env.worker_process_setup_hook``). It loads
    no torch: the ingest actor never needs it, and the learner's modules load it themselves."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass
class PollResult:
    interactions: list[Interaction] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    controls: list[dict[str, str]] = field(default_factory=list)
    read: int = 0


@dataclass(frozen=True)
class ActorInfo:
    """What ``ready()`` answers: a fresh ``incarnation`` for every constructor run, so the driver's
    supervisor sees a restart Ray made by itself (a killed process) as well as one it made."""
    incarnation: str
    pid: int
    node: str


def actor_info() -> ActorInfo:
    return ActorInfo(uuid.uuid4().hex, os.getpid(), socket.gethostname())


def interaction_fields(it: Interaction) -> dict[str, str]:
    """The stream fields an interaction came from (for dead-lettering after validation)."""
    out = {"prompt": it.prompt, "response": it.response, "lineage": it.lineage, "reward": repr(it.reward),
           "id": it.id}
    if it.meta:
        out["meta"] = json.dumps(it.meta)
    return out


# Restarted by Ray when its process or node dies (it declares no CPU, so on a cluster it may sit on any
# worker), and recreated by the driver's supervisor if it dies for good: its state is the Redis connection
# and the ids handed to the driver; entries re-read after a restart are still pending under the same
# consumer and end up as duplicates at worst. Its constructor never touches Redis (the connection is
# made by the first call), so Redis being down while it is created cannot kill it.
@ray.remote(num_cpus=0, max_concurrency=4, max_restarts=-1)
class IngestActor:
    def __init__(self, settings: Settings, redis_url: str, consumer: str) -> None:
        self.s = settings
        self.info_ = actor_info()
        self.r = connect(redis_url)
        self.consumer = StreamConsumer(self.r, settings.stream, settings.group, consumer, settings.claim_idle_ms)
        self.control = StreamConsumer(self.r, settings.control_stream, settings.group, consumer, settings.claim_idle_ms)
        self._grouped = False  # the consumer groups exist (made by the first poll that reaches Redis)
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        # Everything loaded so far lives as long as the process: out of the collector's sight, a
        # poll's thousands of short-lived objects no longer make it rescan Ray's own (bench/throughput.py).
        gc.freeze()

    def ready(self) -> ActorInfo:
        return self.info_

    def poll(self, max_items: int) -> PollResult:
        res = PollResult()
        if not self._grouped:
            self.consumer.ensure_group()
            self.control.ensure_group()
            self._grouped = True
        # Never blocks: Redis serves BLOCK timeouts on its 100 ms clock (hz 10), so even a 1 ms block
        # on the idle control stream cost every poll 100 ms (bench/throughput.py, ingest).
        for eid, fields in self.control.read(16, None):
            res.controls.append({k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                                 for k, v in fields.items()})
            self.control.ack([eid])
        with self._lock:
            skip = set(self._inflight)
        try:
            entries = self.consumer.read(max(1, min(max_items, self.s.read_count)), self.s.read_block_ms, skip)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # Redis came back without the group (restarted without persistence): recreate it.
            self.consumer.ensure_group()
            self.control.ensure_group()
            entries = []
        res.read = len(entries)
        for eid, fields in entries:
            parsed = parse_entry(eid, fields, self.s.max_entry_bytes)
            if isinstance(parsed, Rejection):
                self.consumer.dead_letter(eid, fields, parsed.reason, parsed.detail)
                res.rejected[parsed.reason] = res.rejected.get(parsed.reason, 0) + 1
            else:
                res.interactions.append(parsed)
        with self._lock:
            self._inflight.update(it.entry_id for it in res.interactions)
        return res

    def ack(self, entry_ids: list[str]) -> int:
        n = self.consumer.ack(entry_ids)
        with self._lock:
            self._inflight.difference_update(entry_ids)
        return n

    def dead_letter(self, it: Interaction, reason: str, detail: str) -> None:
        fields = {k.encode(): v.encode() for k, v in interaction_fields(it).items()}
        self.consumer.dead_letter(it.entry_id, fields, reason, detail)
        with self._lock:
            self._inflight.discard(it.entry_id)

    def info(self) -> GroupInfo:
        return self.consumer.info()


# ``ready`` runs in a concurrency group of its own, so the supervisor's health check is answered while
# a learn window or a reduction runs (those still run one at a time, in the default group).
@ray.remote(concurrency_groups={"health": 1})
class LearnerActor:
    def __init__(self, settings: Settings, lineage: str, threads: int) -> None:
        import torch

        self.info_ = actor_info()

        torch.set_num_threads(max(1, threads))
        from daemon.lineage import LineageWorker

        self.worker = LineageWorker(settings, lineage)
        self.node = socket.gethostname()
        self.pid = os.getpid()

    @ray.method(concurrency_group="health")
    def ready(self) -> ActorInfo:
        return self.info_

    def window_items(self) -> int:
        """New interactions the next window wants (asked once, before the first window's report says it)."""
        return self.worker.window_items()

    def learn(self, interactions: list[Interaction]):
        return self.worker.learn(interactions)

    def snapshot(self, trigger: str):
        return self.worker.snapshot(trigger)

    def finish_reduction(self, snap, result):
        return self.worker.finish_reduction(snap, result)

    def status(self) -> dict:
        return {**self.worker.status(), "node": self.node, "pid": self.pid, "time": time.time()}


# Restarted by Ray when its process dies; a reduction it was running is lost (the driver asks the learner
# for a new snapshot). It holds nothing but its thread count: everything it reads and writes is in the
# snapshot's folder.
@ray.remote(concurrency_groups={"health": 1})
class ReducerActor:
    def __init__(self, settings: Settings, threads: int) -> None:
        import torch

        self.info_ = actor_info()
        self.s = settings
        torch.set_num_threads(max(1, threads))

    @ray.method(concurrency_group="health")
    def ready(self) -> ActorInfo:
        return self.info_

    def reduce(self, snap):
        from daemon.snapshots import run_reduction

        return run_reduction(snap, self.s)
