"""Prometheus metrics and the /metrics + /healthz endpoint, served by the daemon's driver process.

Actors report numbers back to the driver in their return values (``LearnReport``,
``ReductionReport``, poll results); the driver updates these metrics, so one endpoint carries
every actor's figures and no actor needs a port of its own.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from daemon.schema import REASONS
from policies.curation import REASONS as CURATION_REASONS
from policies.gate import FATES as GATE_FATES
from policies.gate import REFUSAL_REASONS, SET_ASIDE_REASONS

disable_created_metrics()
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Label values known in advance: their series start at 0, so dashboards and rate() work before the first event.
REJECTION_REASONS = tuple(sorted(REASONS | {"learn_failed", "unknown_lineage"} | set(SET_ASIDE_REASONS)))
REDUCTION_OUTCOMES = ("promoted", "rejected", "failed")
ROLLBACK_REASONS = REFUSAL_REASONS  # policies/gate.py judge_window
ACTOR_KINDS = ("ingest", "learner")
FATES = GATE_FATES + ("skipped",)  # skipped: by curation, before learning (policies/curation.py)


class Metrics:
    def __init__(self, version: str) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Info("cascade_build", "cascade-lm version", registry=r)
        self.build_info.info({"version": version})
        self.received = Counter("cascade_interactions_received", "Valid interactions read from the stream",
                                ["lineage"], registry=r)
        self.learned = Counter("cascade_interactions_learned", "Interactions learned into a checkpointed adapter",
                               ["lineage"], registry=r)
        self.tokens_learned = Counter("cascade_tokens_learned", "Response tokens of the interactions learned",
                                      ["lineage"], registry=r)
        self.tokens_trained = Counter("cascade_tokens_trained", "Loss-carrying tokens through the optimizer "
                                      "(replayed rows and rolled-back windows included)", ["lineage"], registry=r)
        self.rejected = Counter("cascade_interactions_rejected", "Entries dead-lettered, by reason code",
                                ["reason"], registry=r)
        self.duplicate = Counter("cascade_interactions_duplicate", "Entries whose id was already handled",
                                 ["lineage"], registry=r)
        self.heldout_added = Counter("cascade_interactions_heldout", "Interactions kept out of training as held-out data",
                                     ["lineage"], registry=r)
        self.fate = Counter("cascade_interactions_fate", "What became of the interactions learners received: "
                            "learned, heldout, deferred (kept to be tried again), refused (set aside as harmful or "
                            "unlearnable), replayed (deferred, then moved to the replay store by the queue's "
                            "bound), duplicate, skipped (by curation: see cascade_interactions_curated_total); a deferred "
                            "interaction counts again when it is learned, refused or replayed", ["lineage", "fate"],
                            registry=r)
        self.curated = Counter("cascade_interactions_curated", "Interactions curation skipped before learning, by "
                               "reason (exact_duplicate, near_duplicate, junk, flood, known, improbable); each is "
                               "copied to <stream>:skipped", ["lineage", "reason"], registry=r)
        self.deferred_waiting = Gauge("cascade_interactions_deferred", "Deferred interactions waiting to be tried "
                                      "again", ["lineage"], registry=r)
        self.source_forgetting = Gauge("cascade_source_forgetting", "Held-out loss above the best reached, per "
                                       "source (the gate bounds it by CASCADE_GATE_TOTAL_BUDGET)",
                                       ["lineage", "domain"], registry=r)
        self.lag = Gauge("cascade_stream_lag", "Entries not yet delivered to the consumer group",
                         ["stream", "group"], registry=r)
        self.pending = Gauge("cascade_stream_pending", "Entries delivered but not yet acknowledged",
                             ["stream", "group"], registry=r)
        self.steps = Counter("cascade_update_steps", "Optimizer steps taken", ["lineage"], registry=r)
        self.rollbacks = Counter("cascade_update_rollbacks", "Update windows rolled back by the gate",
                                 ["lineage", "reason"], registry=r)
        self.update_seconds = Histogram("cascade_update_seconds", "Seconds per update window (steps, gate, checkpoint)",
                                        buckets=SECONDS_BUCKETS, registry=r)
        self.train_loss = Gauge("cascade_train_loss", "Mean training loss of the last update window",
                                ["lineage"], registry=r)
        self.heldout_loss = Gauge("cascade_heldout_loss", "Held-out loss (nats/token) of the live adapter",
                                  ["lineage", "domain"], registry=r)
        self.forgetting = Gauge("cascade_forgetting", "Mean held-out loss above the best reached, over sources",
                                ["lineage"], registry=r)
        self.replay_items = Gauge("cascade_replay_items", "Items in the replay store", ["lineage"], registry=r)
        self.generation = Gauge("cascade_generation", "Current generation number", ["lineage"], registry=r)
        self.parameters = Gauge("cascade_model_parameters", "Parameters of the current generation",
                                ["lineage"], registry=r)
        self.reductions = Counter("cascade_reductions", "Reductions by outcome (promoted, rejected, failed)",
                                  ["lineage", "outcome"], registry=r)
        self.reduction_seconds = Histogram("cascade_reduction_seconds", "Seconds per reduction",
                                           buckets=SECONDS_BUCKETS, registry=r)
        self.exports = Counter("cascade_exports", "Exports of promoted generations (CASCADE_EXPORT), by outcome "
                               "(ok, failed)", ["lineage", "outcome"], registry=r)
        self.ingest_to_learn = Histogram("cascade_ingest_to_learn_seconds",
                                         "Seconds from XADD to acknowledgement after learning",
                                         buckets=SECONDS_BUCKETS, registry=r)
        self.phase = Gauge("cascade_learning_phase", "1 for the phase each lineage's adapter is in (CASCADE_PHASES)",
                           ["lineage", "phase"], registry=r)
        self.knob = Gauge("cascade_learning_knob", "Learning rate, replay ratio and distillation weight in force "
                          "(after the phase and the self-tuner)", ["lineage", "knob"], registry=r)
        self.tuning_changes = Counter("cascade_tuning_changes", "Changes the self-tuner made, by knob and direction",
                                      ["lineage", "knob", "direction"], registry=r)
        self.up = Gauge("cascade_redis_up", "1 when the last Redis call succeeded", registry=r)
        self.paused = Gauge("cascade_paused", "1 while learning is paused by a control command", registry=r)
        self.actor_restarts = Counter("cascade_actor_restarts", "Actors restarted (by Ray) or created again (by the "
                                      "daemon's supervisor) after they died, by kind", ["kind"], registry=r)
        self.part_up = Gauge("cascade_part_up", "1 while a part the daemon depends on is up (redis, ingest, "
                             "learner:<lineage>); see /healthz for since when and why", ["part"], registry=r)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for kind in ACTOR_KINDS:
            self.actor_restarts.labels(kind)

    def add_lineage(self, lineage: str) -> None:
        """Start the per-lineage series whose labels are known in advance at 0."""
        for c in (self.received, self.learned, self.duplicate):
            c.labels(lineage)
        for outcome in REDUCTION_OUTCOMES:
            self.reductions.labels(lineage, outcome)
        for reason in ROLLBACK_REASONS:
            self.rollbacks.labels(lineage, reason)
        for fate in FATES:
            self.fate.labels(lineage, fate)
        for reason in CURATION_REASONS:
            self.curated.labels(lineage, reason)
        self.deferred_waiting.labels(lineage)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON; 503 when unhealthy)."""

    def __init__(self, metrics: Metrics, host: str, port: int, health: Callable[[], dict]) -> None:
        m = metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = m.render(), CONTENT_TYPE_LATEST, 200
                elif self.path.split("?")[0] == "/healthz":
                    h = health()
                    body, ctype = json.dumps(h).encode(), "application/json"
                    code = 200 if h.get("status") == "ok" else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> "MetricsServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
