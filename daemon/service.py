"""The daemon: settings in, Ray and Redis up, actors supervised, metrics served, signals obeyed.

The driver loop is the only place that knows about every lineage. It keeps one poll of the
ingest actor in flight, a bounded buffer of validated interactions per lineage, and at most one
call (a learn window or a reduction) in flight per learner. It acknowledges entries only when a
learner's report says they are durable, and it publishes promoted generations.

Start-up waits for Redis (and a configured Ray cluster) for up to CASCADE_STARTUP_TIMEOUT seconds.
The actors are rows in a :class:`daemon.supervisor.Supervisor`, which recreates any that dies for
good; a call that fails because its actor died is put back, never counted against the work.
"""
from __future__ import annotations

import collections
import gc
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import redis

from daemon.config import Settings
from daemon.embedded_redis import EmbeddedRedis
from daemon.foundation import ensure_foundation
from daemon.metrics import Metrics, MetricsServer
from daemon.registry import GEN_RE, LINEAGE_RE, Registry, check_lineage
from daemon.reports import ReductionReport
from daemon.schema import Interaction
from daemon.stream import connect, redact_url
from daemon.supervisor import StartupError, Supervisor, one_line, wait_for

log = logging.getLogger("cascade.daemon")
MAX_LEARN_ATTEMPTS = 3


def package_version() -> str:
    try:
        return version("cascade-lm")
    except PackageNotFoundError:
        return "0+unknown"


def stream_ms(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


def secure_local_ray_env() -> None:
    """Loopback listeners and token authentication with a fresh random token for the daemon's own
    Ray, unless the operator chose otherwise with ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN(_PATH)``."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not ({"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ)):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def start_ray(settings: Settings, deadline: float) -> bool:
    """Join ``CASCADE_RAY_ADDRESS`` (a cluster still starting is tried again until ``deadline``, each try
    itself waiting up to ~30 s for Ray Client) or start a Ray of this process's own on 127.0.0.1; True
    when this process started it. Used by ``cascade run`` and ``cascade serve``."""
    if not settings.ray_address:
        secure_local_ray_env()  # Ray reads its settings when it is first imported, so before `import ray`
    import ray

    runtime_env = {"worker_process_setup_hook": "daemon.actors.setup_worker",
                   "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if ray.is_initialized():
        return False
    if settings.ray_address:
        wait_for(f"join the Ray cluster at {settings.ray_address}",
                 lambda: ray.init(address=settings.ray_address, runtime_env=runtime_env, logging_level=logging.WARNING),
                 (ConnectionError,), deadline, settings.startup_timeout)
        return False
    # address="local": always a Ray of the daemon's own, never a `ray start` cluster that happens to run
    # on this machine (or RAY_ADDRESS) with other code and other credentials.
    ctx = ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, object_store_memory=256 << 20,
                   _node_ip_address="127.0.0.1", runtime_env=runtime_env, logging_level=logging.WARNING,
                   configure_logging=False)
    gcs = ctx.address_info["gcs_address"]
    if os.environ["RAY_AUTH_MODE"] == "token":
        log.info("local Ray started on %s with token authentication (RAY_AUTH_MODE=token)", gcs)
    else:
        log.warning("local Ray started on %s without token authentication (RAY_AUTH_MODE=%s)", gcs,
                    os.environ["RAY_AUTH_MODE"])
    return True


@dataclass
class Job:
    lineage: str
    # "window" (asking a learner how many interactions its next window wants), "learn", and a reduction's three:
    # "snapshot" (the learner writes one), "reduce" (the reducer reduces it), "adopt" (the learner takes the result)
    kind: str
    started: float
    payload: object = None  # learn: the window's interactions; snapshot: the trigger; reduce: the Snapshot;
    # adopt: (Snapshot, the reducer's ReductionReport)


class Daemon:
    """Start with :meth:`start`, drive with :meth:`run` (until :meth:`request_stop`), then :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.registry = Registry(settings.registry_root)
        self.metrics = Metrics(package_version())
        self.phase_names = settings.phase_schedule().names
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = settings.redis_url
        self._stop = threading.Event()
        self._ray_started = False
        self.server: MetricsServer | None = None
        self.sup = Supervisor(self.metrics)
        self.holding: set[str] = set()  # entry ids read and not yet acknowledged or dead-lettered
        self.buffers: dict[str, collections.deque[Interaction]] = collections.defaultdict(collections.deque)
        self.jobs: dict[object, Job] = {}
        self.reduce_requests: dict[str, str] = {}
        self.to_reduce: dict[str, object] = {}  # lineage -> its Snapshot, waiting for the reducer to be up
        self.adoptions: dict[str, tuple] = {}  # lineage -> (Snapshot, the reducer's report), for its learner
        self.failures: dict[str, int] = {}  # first entry id of a window -> failed attempts
        self.last_dispatch: dict[str, float] = {}
        self.windows: dict[str, int] = {}  # per lineage, the size its learner asked for in its last report
        self.unacked: list[str] = []  # durable but not yet acknowledged (Redis was unreachable)
        self.uncopied: list[dict] = []  # skipped (durable in a ledger), not yet copied to <stream>:skipped
        self.paused = False
        self.redis_ok = False
        self.last_report: dict[str, dict] = {}
        self.on_reduction = None  # optional callback(ReductionReport), called for every outcome

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, handle_signals: bool = False) -> "Daemon":
        s = self.s
        s.home.mkdir(parents=True, exist_ok=True)
        if s.metrics_host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("CASCADE_METRICS_HOST=%s exposes /metrics and /healthz beyond this machine", s.metrics_host)
        if self.redis_url is None:
            self.embedded = EmbeddedRedis(s.home).start()
            self.redis_url = self.embedded.url
            log.info("embedded Redis on %s", self.embedded.socket)
        self.redis = connect(self.redis_url)
        self.deadline = time.monotonic() + s.startup_timeout
        self._wait_for_redis()
        self._set_redis(True)
        ensure_foundation(self.registry.lineage("main"), s.base_model)
        self._start_ray()
        if handle_signals:  # after ray.init, which installs handlers of its own; before /healthz answers
            self.install_signal_handlers()
        self.server = MetricsServer(self.metrics, s.metrics_host, s.metrics_port, self.health).start()
        log.info("metrics on http://%s:%d/metrics", s.metrics_host, self.server.port)
        from daemon.actors import IngestActor

        consumer = f"cascade-{socket.gethostname()}"
        self.sup.add("ingest", "ingest", lambda: IngestActor.remote(s, self.redis_url, consumer))
        # Snapshots of an earlier run wait for a reducer no longer there: their learners learn on without them.
        shutil.rmtree(s.home / "reductions", ignore_errors=True)
        for lineage in self.registry.lineages():
            self._learner(lineage)
        if s.serve:  # the OpenAI-compatible API beside learning (daemon/serving/)
            from daemon.serving.runner import start_serving

            start_serving(s, self.redis_url, self.metrics.registry)
        gc.freeze()  # what start loaded lives as long as the daemon: the collector need not rescan it
        return self

    def _wait_for_redis(self) -> None:
        """Redis down (or still loading its data) is waited out; wrong credentials and an untrusted TLS
        certificate are not (no wait makes them right): they stop the start at once, in one sentence."""
        def ping() -> None:
            try:
                self.redis.ping()
            except redis.AuthenticationError as e:  # a ConnectionError in redis-py: checked first
                raise StartupError(f"Redis at {redact_url(self.redis_url)} refused the credentials in "
                                   f"CASCADE_REDIS_URL ({e})") from None
            except redis.ConnectionError as e:
                if "CERTIFICATE_VERIFY_FAILED" in str(e):
                    raise StartupError(f"cannot reach Redis at {redact_url(self.redis_url)}: its TLS certificate "
                                       f"is not trusted ({one_line(e)})") from None
                raise

        transient = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
        wait_for(f"reach Redis at {redact_url(self.redis_url)}", ping, transient, self.deadline, self.s.startup_timeout)

    def _start_ray(self) -> None:
        self._ray_started = start_ray(self.s, self.deadline)

    @property
    def ingest(self):
        return self.sup.handle("ingest")

    @property
    def learners(self) -> dict[str, object]:
        """Lineage -> its learner actor (the supervisor's current handle)."""
        return {name.partition(":")[2]: p.handle for name, p in self.sup.of_kind("learner").items()}

    def _learner(self, lineage: str):
        name = f"learner:{lineage}"
        if name in self.sup.parts:
            return self.sup.handle(name)
        from daemon.actors import LearnerActor

        cpus = self.s.learner_cpus
        threads = max(1, int(cpus)) if cpus else self._cores()
        gpus = self.s.learner_gpus if self._wants_gpu() else 0
        make = lambda: LearnerActor.options(num_cpus=cpus, num_gpus=gpus, name=f"cascade-learner-{lineage}",  # noqa: E731
                                            max_restarts=-1, max_task_retries=0).remote(self.s, lineage, threads)
        self.metrics.add_lineage(lineage)
        part = self.sup.add(name, "learner", make)
        self._refresh_lineage_gauges(lineage)
        return part.handle

    def _cores(self) -> int:
        """The cores of the Ray cluster (this machine's, on the local default)."""
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", os.cpu_count() or 1)))

    def _wants_gpu(self) -> bool:
        """A learner declares one GPU when asked for (``cuda``) or, on ``auto``, when the cluster has one."""
        import ray

        if self.s.device.startswith("cuda"):
            return True
        return self.s.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0

    def _refresh_lineage_gauges(self, lineage: str) -> None:
        d = self.registry.lineage(lineage)
        gen = d.current()
        card = d.card(gen)
        self.metrics.generation.labels(lineage).set(int(GEN_RE.match(gen).group(1)))
        self.metrics.parameters.labels(lineage).set(card["n_params"])

    def request_stop(self, *_args) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def stop(self, grace_s: float = 300.0) -> None:
        """Finish learn windows in flight (acknowledging what they made durable), abandon the rest."""
        import ray

        deadline = time.monotonic() + grace_s
        while self.jobs and time.monotonic() < deadline:
            learn_refs = [r for r, j in self.jobs.items() if j.kind == "learn"]
            if not learn_refs:
                break
            ready, _ = ray.wait(learn_refs, num_returns=1, timeout=1.0)
            for ref in ready:
                self._handle(ref)
        if self.uncopied:
            self._flush_skipped()
        self._flush_acks()
        if ray.is_initialized():
            self.sup.remove_all()
        if self.s.serve:
            from daemon.serving.runner import stop_serving

            stop_serving()
        if self.server:
            self.server.stop()
        if self._ray_started:
            ray.shutdown()
        if self.embedded:
            self.embedded.stop()
        log.info("stopped")

    # -- health ----------------------------------------------------------------------------------
    def health(self) -> dict:
        """``ok`` (HTTP 200) while the stream is read: Redis and the ingest actor up. A learner down (being
        restarted, or waiting for a node with room) is listed under ``down`` with since when and why, but
        does not fail the check: restarting the daemon would not bring it back sooner."""
        parts = self.sup.health()
        reading = self.redis_ok and self.sup.is_up("ingest")
        return {"status": "ok" if reading else "degraded", "redis": self.redis_ok,
                "down": {n: p for n, p in parts.items() if not p["up"]}, "parts": parts,
                "paused": self.paused, "lineages": sorted(self.learners),
                "jobs": [{"lineage": j.lineage, "kind": j.kind, "seconds": round(time.monotonic() - j.started, 1)}
                         for j in self.jobs.values()]}

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        import ray

        poll_ref = None
        info_ref, next_info = None, 0.0
        drained = False
        while not self._stop.is_set():
            self.sup.tick()
            reading = self.sup.is_up("ingest")
            buffered = sum(len(b) for b in self.buffers.values())
            room = self.s.max_buffered * max(1, len(self.learners)) - buffered
            if poll_ref is None and room > 0 and reading:
                poll_ref = self.ingest.poll.remote(room)
            if info_ref is None and time.monotonic() >= next_info and reading:
                info_ref, next_info = self.ingest.info.remote(), time.monotonic() + 2.0
            refs = [r for r in (poll_ref, info_ref) if r is not None] + list(self.jobs)
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5) if refs else ([], [])
            for ref in ready:
                if ref == poll_ref:  # equality, not identity: Ray Client returns new ref objects from wait()
                    poll_ref = None
                    drained = self._on_poll(ref)
                elif ref == info_ref:
                    info_ref = None
                    self._on_info(ref)
                else:
                    self._handle(ref)
            self._dispatch(drained)
            if self.uncopied and self.redis_ok:
                self._flush_skipped()
            if self.unacked and self.redis_ok:
                self._flush_acks()
            if self.embedded is not None and not self.redis_ok and self.embedded.exited():
                log.warning("the embedded Redis exited; starting it again")
                self.embedded.start()

    def _set_redis(self, ok: bool, reason: str = "") -> None:
        self.redis_ok = ok
        self.metrics.up.set(1 if ok else 0)
        self.sup.set_state("redis", ok, reason)

    def _on_poll(self, ref) -> bool:
        import ray

        try:
            res = ray.get(ref)
            self._set_redis(True)
        except ray.exceptions.RayActorError as e:  # the ingest actor died: the supervisor brings it back
            self.sup.suspect("ingest", e)
            return False
        except Exception as e:  # Redis unreachable: back off, the next poll retries
            self._set_redis(False, one_line(e))
            log.warning("reading the stream failed: %s", e)
            time.sleep(1.0)
            return False
        for reason, n in res.rejected.items():
            self.metrics.rejected.labels(reason).inc(n)
        for cmd in res.controls:
            self._control(cmd)
        received: collections.Counter[str] = collections.Counter()
        for it in res.interactions:
            if it.entry_id in self.holding:  # delivered again by a restarted ingest actor
                continue
            if it.lineage not in self.learners and not self._admit_lineage(it):
                continue
            received[it.lineage] += 1
            self.holding.add(it.entry_id)
            self.buffers[it.lineage].append(it)
        for lineage, n in received.items():
            self.metrics.received.labels(lineage).inc(n)
        return res.read == 0

    def _admit_lineage(self, it: Interaction) -> bool:
        d = self.registry.lineage(it.lineage)
        if not d.exists():
            if self.s.unknown_lineage == "fork":
                from daemon.forking import fork_lineage

                fork_lineage(self.registry, f"main/{self.registry.lineage('main').current()}", it.lineage)
            else:
                self.ingest.dead_letter.remote(it, "unknown_lineage",
                                               f"lineage {it.lineage!r} does not exist (fork it first)")
                self.metrics.rejected.labels("unknown_lineage").inc()
                return False
        self._learner(it.lineage)
        return True

    def _on_info(self, ref) -> None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self.sup.suspect("ingest", e)
            return
        except Exception:
            return
        self.metrics.lag.labels(self.s.stream, self.s.group).set(info.lag)
        self.metrics.pending.labels(self.s.stream, self.s.group).set(info.pending)

    def _control(self, cmd: dict[str, str]) -> None:
        name = cmd.get("command", "")
        log.info("control: %s", cmd)
        if name == "pause":
            self.paused = True
        elif name == "resume":
            self.paused = False
        elif name == "reduce":
            lineage = cmd.get("lineage", "main")
            if LINEAGE_RE.match(lineage) and (lineage in self.learners or self.registry.lineage(lineage).exists()):
                self._learner(lineage)
                self.reduce_requests[lineage] = "command"
            else:
                log.warning("control: reduce of unknown lineage %r ignored", lineage)
        elif name == "fork":
            from daemon.forking import fork_lineage

            try:
                fork_lineage(self.registry, cmd.get("from", ""), check_lineage(cmd.get("to", "")))
                self._learner(cmd["to"])
            except Exception as e:
                log.warning("control: fork failed: %s", e)
        else:
            log.warning("control: unknown command %r ignored", name)
        self.metrics.paused.set(1 if self.paused else 0)

    def _dispatch(self, drained: bool) -> None:
        # A reduction runs in the reducer actor while its lineage goes on learning: only the learners' own
        # calls (window, learn, snapshot, adopt) make a lineage busy and make learners sharing cores wait.
        self._submit_reductions()
        busy = {j.lineage for j in self.jobs.values() if j.kind != "reduce"}
        reducing = ({j.lineage for j in self.jobs.values() if j.kind in ("snapshot", "reduce")}
                    | set(self.to_reduce) | set(self.adoptions))
        # Oldest-served lineage first, so one busy lineage cannot starve the others.
        learners = self.learners
        for lineage in sorted(learners, key=lambda name: self.last_dispatch.get(name, 0.0)):
            actor = learners[lineage]
            if lineage in busy or not self.sup.is_up(f"learner:{lineage}"):
                continue
            if not self.s.learner_cpus and busy:
                return  # learners sharing the node's cores take turns
            call = None
            if lineage in self.adoptions:  # the reducer answered: the learner adopts or drops its result
                snap, result = self.adoptions.pop(lineage)
                call = (actor.finish_reduction.remote(snap, result),
                        Job(lineage, "adopt", time.monotonic(), (snap, result)))
            elif lineage in self.reduce_requests and lineage not in reducing:
                trigger = self.reduce_requests.pop(lineage)
                call = actor.snapshot.remote(trigger), Job(lineage, "snapshot", time.monotonic(), trigger)
            elif self.buffers[lineage] and not self.paused:
                buf, n = self.buffers[lineage], self.windows.get(lineage)  # the learner owns its window's size
                if n is None:  # no report yet: ask it
                    call = actor.window_items.remote(), Job(lineage, "window", time.monotonic())
                elif len(buf) >= n or drained:
                    batch = [buf.popleft() for _ in range(min(n, len(buf)))]
                    call = actor.learn.remote(batch), Job(lineage, "learn", time.monotonic(), batch)
            if call is not None:
                self.jobs[call[0]] = call[1]
                busy.add(lineage)
                if call[1].kind != "window":
                    self.last_dispatch[lineage] = time.monotonic()

    def _submit_reductions(self) -> None:
        """Snapshots to the reducer, once it is up (a call made while Ray restarts it would fail unrun)."""
        if not self.to_reduce or ("reducer" in self.sup.parts and not self.sup.is_up("reducer")):
            return
        for lineage, snap in list(self.to_reduce.items()):
            self.jobs[self.reducer.reduce.remote(snap)] = Job(lineage, "reduce", time.monotonic(), snap)
            del self.to_reduce[lineage]

    @property
    def reducer(self):
        """The reducer actor, made at the first reduction (a daemon that never reduces never starts one)."""
        if "reducer" not in self.sup.parts:
            from daemon.actors import ReducerActor

            gpus = self.s.learner_gpus if self._wants_gpu() else 0  # a learner's share of a GPU, when they use one
            self.sup.add("reducer", "reducer", lambda: ReducerActor.options(
                num_cpus=0, num_gpus=gpus, name="cascade-reducer", max_restarts=-1, max_task_retries=0,
            ).remote(self.s, max(1, self._cores() // 2)))
        return self.sup.handle("reducer")

    def _handle(self, ref) -> None:
        import ray

        job = self.jobs.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._actor_died(job, e)
            return
        except Exception as e:  # noqa: BLE001
            self._job_failed(job, e)
            return
        if job.kind == "window":
            self.windows[job.lineage] = result
        elif job.kind == "learn":
            self.failures.pop(job.payload[0].entry_id, None)
            self._on_learned(result)
        elif job.kind == "snapshot":
            if isinstance(result, ReductionReport):  # nothing to reduce on yet
                self._on_reduced(result)
            else:
                self.to_reduce[job.lineage] = result
        elif job.kind == "reduce":
            self.adoptions[job.lineage] = (job.payload, result)
        else:  # adopt
            self.failures.pop(f"reduce:{job.lineage}", None)
            self._on_reduced(result)

    def _actor_died(self, job: Job, e: BaseException) -> None:
        """The actor died under the call (killed, its node lost; Ray or the supervisor brings it back, a
        learner from its checkpoint): no fault of the work's, so a window waits for its learner without
        counting an attempt. A reduction is tried again up to MAX_LEARN_ATTEMPTS times: the same snapshot
        when the reducer died (its learner still waits for it), a new one when the learner died while taking
        it, the same candidate when the learner died while adopting it."""
        part = "reducer" if job.kind == "reduce" else f"learner:{job.lineage}"
        log.warning("lineage %s: %s died during %s, put back: %s", job.lineage, part, job.kind, one_line(e))
        self.sup.suspect(part, e)
        if job.kind == "learn":
            self.buffers[job.lineage].extendleft(reversed(job.payload))
        elif job.kind != "window":
            key = f"reduce:{job.lineage}"
            self.failures[key] = self.failures.get(key, 0) + 1
            if self.failures[key] >= MAX_LEARN_ATTEMPTS:  # given up
                del self.failures[key]
                if job.kind == "reduce":  # counted when its learner has dropped the snapshot
                    self._job_failed(job, e)
                    return
            elif job.kind == "adopt":
                self.adoptions[job.lineage] = job.payload
            elif job.kind == "reduce":
                self.to_reduce[job.lineage] = job.payload
            else:
                self.reduce_requests.setdefault(job.lineage, job.payload)
            self.metrics.reductions.labels(job.lineage, "failed").inc()

    def _job_failed(self, job: Job, e: BaseException) -> None:
        """The call raised. A window is dispatched again, up to MAX_LEARN_ATTEMPTS times, then its entries
        are dead-lettered; a failed reduction is counted (a reducer's failure through its learner, which
        drops the snapshot)."""
        log.error("lineage %s: %s failed: %s", job.lineage, job.kind, e)
        if job.kind == "reduce":
            snap = job.payload
            self.adoptions[job.lineage] = (snap, ReductionReport(
                job.lineage, "failed", snap.parent, snap.parent, snap.n_params, snap.n_params,
                time.monotonic() - job.started, detail=one_line(e)[:500]))
        elif job.kind in ("snapshot", "adopt"):
            self.metrics.reductions.labels(job.lineage, "failed").inc()
        elif job.kind == "learn":
            key = job.payload[0].entry_id
            self.failures[key] = self.failures.get(key, 0) + 1
            if self.failures[key] < MAX_LEARN_ATTEMPTS:
                self.buffers[job.lineage].extendleft(reversed(job.payload))
                return
            # A window that fails again and again is dead-lettered rather than retried forever.
            del self.failures[key]
            for it in job.payload:
                self.ingest.dead_letter.remote(it, "learn_failed", f"learning failed {MAX_LEARN_ATTEMPTS} times: {e}"[:300])
                self.holding.discard(it.entry_id)
            self.metrics.rejected.labels("learn_failed").inc(len(job.payload))

    def _on_learned(self, rep) -> None:
        m, lin = self.metrics, rep.lineage
        self.windows[lin] = rep.window
        held: set[str] = set()
        if rep.skipped and not self._copy_skipped(rep.skipped):
            # Not acknowledged until the copy is made (retried each loop; after a crash the entries are
            # delivered again, found skipped in the ledger and copied then).
            self.uncopied.extend(rep.skipped)
            held = {x["entry_id"] for x in rep.skipped}
        self.unacked.extend(e for e in rep.ack if e not in held)
        self.holding.difference_update(rep.ack)
        self._flush_acks()
        now_ms = time.time() * 1000
        for eid in rep.ack:
            m.ingest_to_learn.observe(max(0.0, (now_ms - stream_ms(eid)) / 1000))
        m.learned.labels(lin).inc(rep.learned)
        m.tokens_learned.labels(lin).inc(rep.learned_tokens)
        m.tokens_trained.labels(lin).inc(rep.tokens)
        m.duplicate.labels(lin).inc(rep.duplicates)
        m.heldout_added.labels(lin).inc(rep.heldout_added)
        m.steps.labels(lin).inc(rep.steps)
        m.update_seconds.observe(rep.update_seconds)
        if rep.steps:
            m.train_loss.labels(lin).set(rep.train_loss)
        for d, v in rep.heldout.items():
            m.heldout_loss.labels(lin, d).set(v)
        m.forgetting.labels(lin).set(rep.forgetting)
        m.replay_items.labels(lin).set(rep.replay_items)
        for reason in rep.rollbacks:
            m.rollbacks.labels(lin, reason).inc()
        first = [x for x in rep.skipped if not x.get("again")]  # a skip copied again was counted when decided
        for fate, n in (("learned", rep.learned), ("heldout", rep.heldout_added), ("deferred", rep.deferred),
                        ("refused", len(rep.refused)), ("replayed", rep.replayed), ("duplicate", rep.duplicates),
                        ("skipped", len(first))):
            m.fate.labels(lin, fate).inc(n)
        for x in first:
            m.curated.labels(lin, x["reason"]).inc()
        m.deferred_waiting.labels(lin).set(rep.deferred_waiting)
        for d, gap in rep.source_forgetting.items():
            m.source_forgetting.labels(lin, d).set(gap)
        if rep.refused:
            self._set_aside(lin, rep.refused)
        if rep.phase:
            for name in self.phase_names:
                m.phase.labels(lin, name).set(1 if name == rep.phase else 0)
        for knob, value in rep.knobs.items():
            m.knob.labels(lin, knob).set(value)
        for c in rep.tuning:
            m.tuning_changes.labels(lin, c.knob, c.direction).inc()
        self.last_report[lin] = {"learned": rep.learned, "train_loss": rep.train_loss}
        if rep.reduce_due and lin not in self.reduce_requests:
            self.reduce_requests[lin] = "every"

    def _copy_skipped(self, records: list[dict]) -> bool:
        """Copy what curation skipped to ``<stream>:skipped`` (bounded: MAXLEN ~ CASCADE_SKIPPED_MAX_ENTRIES)
        with its reason, where an operator sees it and can publish it again (``cascade skipped``). The skip
        is already durable in the lineage's ledger; False when Redis refused the copy."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for x in records:
                pipe.xadd(self.s.skipped_stream, {
                    "source_id": x["entry_id"], "reason": x["reason"], "detail": x["detail"], "id": x["id"],
                    "prompt": x["prompt"], "response": x["response"], "reward": repr(float(x["reward"])),
                    "meta": json.dumps(x["meta"]), "lineage": x["lineage"]},
                    maxlen=self.s.skipped_max_entries, approximate=True)
            pipe.execute()
            return True
        except redis.RedisError as e:
            if isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
                self._set_redis(False, one_line(e))
            log.warning("copying %d skipped interactions to %s failed (will retry): %s", len(records),
                        self.s.skipped_stream, e)
            return False

    def _flush_skipped(self) -> None:
        """Copies that failed, retried; their entries are acknowledged once they are made."""
        records, self.uncopied = self.uncopied, []
        if self._copy_skipped(records):
            self.unacked.extend(x["entry_id"] for x in records)
            self._flush_acks()
        else:
            self.uncopied = records + self.uncopied

    def _set_aside(self, lineage: str, refused: list[dict]) -> None:
        """Copy interactions the gate refused to the dead-letter stream, with the reason, where an operator
        sees them and can publish them again (the ledger already records them as refused)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            for x in refused:
                pipe.xadd(self.s.dead_stream, {"source_id": "", "reason": x["reason"], "detail": x["detail"],
                                               "prompt": x["prompt"], "response": x["response"], "lineage": lineage,
                                               "reward": repr(x["reward"]), "id": x["id"],
                                               "meta": json.dumps({"domain": x["domain"]})})
            pipe.execute()
        except redis.RedisError as e:
            log.error("lineage %s: copying %d refused interactions to %s failed: %s", lineage, len(refused),
                      self.s.dead_stream, e)
        for x in refused:
            self.metrics.rejected.labels(x["reason"]).inc()

    def _on_reduced(self, rep) -> None:
        self.metrics.reductions.labels(rep.lineage, rep.outcome).inc()
        self.metrics.reduction_seconds.observe(rep.seconds)
        if rep.outcome == "promoted":
            self.metrics.exports.labels(rep.lineage, "ok").inc(len(rep.card.get("exports", [])))
            self.metrics.exports.labels(rep.lineage, "failed").inc(len(rep.export_failures))
            self._promote(rep)
        else:
            log.warning("lineage %s: reduction %s: %s", rep.lineage, rep.outcome, rep.detail[:500])
        if self.on_reduction:
            self.on_reduction(rep)

    def _promote(self, rep) -> None:
        path = self.registry.lineage(rep.lineage).path / rep.generation
        try:
            self.redis.xadd(self.s.generations_stream, {
                "lineage": rep.lineage, "generation": rep.generation, "path": str(path.resolve()),
                "parent": rep.card["parent"] or "", "n_params": rep.n_params_after, "card": json.dumps(rep.card),
                "exports": json.dumps(rep.card.get("exports", []))})
        except redis.RedisError as e:  # the generation is promoted on disk either way
            log.error("announcing %s/%s on %s failed: %s", rep.lineage, rep.generation, self.s.generations_stream, e)
        self._refresh_lineage_gauges(rep.lineage)
        log.info("lineage %s: generation %s promoted (%d -> %d parameters)", rep.lineage, rep.generation,
                 rep.n_params_before, rep.n_params_after)

    def _flush_acks(self) -> None:
        """Acknowledge durable entries; if Redis is down they wait here and are retried each loop
        (they are already in the ledger, so even a crash now only makes them duplicates later)."""
        import ray

        if not self.unacked or not self.sup.is_up("ingest"):
            return
        try:
            ray.get(self.ingest.ack.remote(self.unacked))
            self.unacked = []
        except ray.exceptions.RayActorError as e:
            self.sup.suspect("ingest", e)
        except Exception as e:  # noqa: BLE001
            self._set_redis(False, one_line(e))
            log.warning("acknowledging %d entries failed (will retry): %s", len(self.unacked), e)
