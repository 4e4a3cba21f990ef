"""Serving metrics, gathered from every replica into one place and shown on the process's ``/metrics``.

Replicas are processes of their own (Ray places them, possibly on other nodes), so each one sends what it counts
to one named actor, ``cascade-serve-stats`` (fire and forget, one call per request), which keeps the Prometheus
series. The driver's ``/metrics`` (the daemon's, or ``cascade serve``'s) reads that actor's exposition at scrape
time through :class:`RemoteCollector`. A replica killed and replaced loses nothing counted; the stats actor is
restarted by Ray if its process dies (counters then start again from zero, as after any restart).
"""
from __future__ import annotations

import logging

import ray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

disable_created_metrics()
STATS_ACTOR = "cascade-serve-stats"
NAMESPACE = "cascade"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
log = logging.getLogger("cascade.serving")


class ServeMetrics:
    """The serving series (plain prometheus_client); the stats actor is this class run by Ray."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cascade_serve_requests", "API requests answered, by lineage, endpoint and status",
                                ["lineage", "endpoint", "status"], registry=r)
        self.tokens = Counter("cascade_serve_tokens", "Tokens of served requests (prompt / completion)",
                              ["lineage", "kind"], registry=r)
        self.ttft = Histogram("cascade_serve_time_to_first_token_seconds", "Seconds from request to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.seconds = Histogram("cascade_serve_request_seconds", "Seconds per completion request",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.feedback = Counter("cascade_serve_feedback", "Feedback and HTTP interactions, by lineage and kind "
                                "(reward, correction, interaction, rejected)", ["lineage", "kind"], registry=r)
        self.batch = Histogram("cascade_serve_batch_size", "Requests decoding together in a batch when a request joins it",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.generation = Gauge("cascade_serve_generation", "Generation number last served per lineage",
                                ["lineage"], registry=r)
        self.step = Gauge("cascade_serve_step", "Live checkpoint step last served per lineage (0: generation alone)",
                          ["lineage"], registry=r)

    def request(self, lineage: str, endpoint: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0,
                ttft: float | None = None, seconds: float | None = None,
                live: tuple[int, int] | None = None) -> None:
        """One answered request; ``live`` = (generation number, step) when a lineage's live model answered."""
        self.requests.labels(lineage, endpoint, str(status)).inc()
        if prompt_tokens:
            self.tokens.labels(lineage, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(lineage, "completion").inc(completion_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if seconds is not None:
            self.seconds.observe(seconds)
        if live is not None:
            self.generation.labels(lineage).set(live[0])
            self.step.labels(lineage).set(live[1])

    def feedback_item(self, lineage: str, kind: str, n: int = 1) -> None:
        self.feedback.labels(lineage, kind).inc(n)

    def batch_size(self, n: int) -> None:
        self.batch.observe(n)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


ServeStats = ray.remote(num_cpus=0, max_restarts=-1)(ServeMetrics)


def stats_actor(create: bool = False):
    """The named stats actor (created on ``create``), or None when it cannot be reached."""
    try:
        if create:
            return ServeStats.options(name=STATS_ACTOR, namespace=NAMESPACE, get_if_exists=True).remote()
        return ray.get_actor(STATS_ACTOR, namespace=NAMESPACE)
    except ValueError:
        return None


class RemoteCollector:
    """A Prometheus collector that reads the stats actor's series at scrape time (2 s at most)."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def describe(self):
        return []  # series appear as replicas count them; nothing to declare up front

    def collect(self):
        try:
            text = ray.get(self.actor.exposition.remote(), timeout=2)
        except Exception as e:  # noqa: BLE001 - a scrape never fails because serving is restarting
            log.warning("serving metrics unavailable: %s", e)
            return
        yield from text_string_to_metric_families(text)
