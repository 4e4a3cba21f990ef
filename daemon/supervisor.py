"""Supervision: every part the daemon depends on, whether it is up, since when, and bringing it back.

A :class:`Supervisor` holds a table of :class:`Part` s. An *actor* part (the ingest actor, one learner per
lineage, the reducer once a reduction asked for one; a serving deployment would be one more row) has a
``make`` that creates it and a restart :class:`Backoff` chosen by its kind. A *condition* part (Redis) has
no ``make``: the driver reports it.

The supervisor learns an actor's state from its ``ready()`` method, called every ``PING_EVERY_S`` seconds
and at once when a call on it failed (:meth:`Supervisor.suspect`):

* it answers: up. A new ``incarnation`` means Ray restarted its process (``max_restarts``): one restart;
* ``ActorUnavailableError``: Ray is restarting it (or waits for a node with room): down, asked again soon;
* ``ActorDiedError``: dead for good (its constructor raised, it was killed for good, restarts ran out):
  it is created afresh after its back-off, which grows with each creation that dies before answering.

An actor's work resumes from what is durable: a learner's constructor loads ``live/``; entries it had
not acknowledged are still pending in the consumer group and are delivered again.

:func:`wait_for` is the same idea for start-up: a dependency that is not there yet (Redis, a Ray cluster)
is tried again with back-off, one log line per try, until a deadline, then :class:`StartupError`.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

log = logging.getLogger("cascade.supervisor")
T = TypeVar("T")
PING_EVERY_S = 5.0
RESTARTING_PING_S = 1.0
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


class StartupError(RuntimeError):
    """A dependency did not come up within CASCADE_STARTUP_TIMEOUT; the message is one sentence."""


@dataclass(frozen=True)
class Backoff:
    """Pause before try ``n`` (1, 2, ...): ``first_s`` doubling up to ``max_s``."""
    first_s: float
    max_s: float
    factor: float = 2.0

    def delay(self, n: int) -> float:
        return min(self.max_s, self.first_s * self.factor ** max(0, n - 1))


# Restart back-off by kind of actor. Start-up waits for its dependencies with STARTUP.
BACKOFF: dict[str, Backoff] = {"ingest": Backoff(0.5, 30.0), "learner": Backoff(2.0, 60.0),
                               "reducer": Backoff(2.0, 60.0)}
STARTUP = Backoff(1.0, 15.0)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Part:
    name: str
    kind: str
    make: Callable[[], Any] | None = None  # None: a condition the driver reports (set_state)
    handle: Any = None
    up: bool = False
    since: float = field(default_factory=time.time)  # wall time of the last change of ``up``
    reason: str = "starting"
    restarts: int = 0
    failures: int = 0  # creations in a row that died before answering
    incarnation: str | None = None
    pid: int | None = None  # of the process that last answered, and its node
    node: str | None = None
    ping: Any = None  # a ready() call in flight
    next_ping: float = 0.0  # monotonic
    recreate_at: float | None = None  # monotonic; set while dead for good


class Supervisor:
    def __init__(self, metrics, backoff: dict[str, Backoff] | None = None) -> None:
        self.metrics = metrics
        self.backoff = backoff or BACKOFF
        self.parts: dict[str, Part] = {}

    # -- the table ---------------------------------------------------------------------------------
    def add(self, name: str, kind: str, make: Callable[[], Any]) -> Part:
        """Create the actor part ``name`` now (it is down until its first ``ready()`` answers)."""
        part = self.parts[name] = Part(name, kind, make)
        self._set(part, False, "starting")
        part.handle = make()
        return part

    def handle(self, name: str):
        part = self.parts.get(name)
        return part.handle if part else None

    def is_up(self, name: str) -> bool:
        part = self.parts.get(name)
        return part is not None and part.up

    def of_kind(self, kind: str) -> dict[str, Part]:
        return {n: p for n, p in self.parts.items() if p.kind == kind}

    def set_state(self, name: str, up: bool, reason: str = "") -> None:
        """A condition part (e.g. Redis), as the driver last found it."""
        part = self.parts.get(name) or self.parts.setdefault(name, Part(name, name))
        self._set(part, up, reason)

    def health(self) -> dict[str, dict]:
        now = time.time()
        return {n: {"kind": p.kind, "up": p.up, "since": rfc3339(p.since), "for_s": round(now - p.since, 1),
                    "reason": "" if p.up else p.reason, "restarts": p.restarts, "pid": p.pid, "node": p.node}
                for n, p in self.parts.items()}

    # -- watching ----------------------------------------------------------------------------------
    def suspect(self, name: str, error: BaseException) -> None:
        """A call on actor ``name`` failed because of the actor: find out now what became of it."""
        part = self.parts.get(name)
        if part is None or part.make is None or part.recreate_at is not None:
            return
        self._set(part, False, one_line(error))
        part.next_ping = 0.0

    def tick(self) -> None:
        """Collect health answers, ask again where due, recreate the dead whose back-off ran out. Never blocks."""
        import ray

        pinging = {p.ping: p for p in self.parts.values() if p.ping is not None}
        if pinging:
            done, _ = ray.wait(list(pinging), num_returns=len(pinging), timeout=0)
            for ref in done:
                self._answered(pinging[ref], ref)
        now = time.monotonic()
        for part in self.parts.values():
            if part.make is None:
                continue
            if part.recreate_at is not None:
                if now >= part.recreate_at:
                    self._recreate(part)
            elif part.ping is None and now >= part.next_ping:
                part.ping = part.handle.ready.remote()

    def _answered(self, part: Part, ref) -> None:
        import ray

        part.ping = None
        now = time.monotonic()
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError as e:  # Ray restarts it, or it waits for room on a node
            self._set(part, False, f"restarting: {one_line(e)}")
            part.next_ping = now + RESTARTING_PING_S
            return
        except ray.exceptions.RayActorError as e:  # dead for good: made again after its back-off
            part.failures += 1
            delay = self.backoff[part.kind].delay(part.failures)
            self._set(part, False, f"dead: {one_line(e)}")
            part.recreate_at = now + delay
            log.error("%s is dead (%s); creating it again in %.1f s", part.name, one_line(e), delay)
            return
        if part.incarnation is not None and info.incarnation != part.incarnation:
            self._count_restart(part, "restarted by Ray")
        part.incarnation, part.pid, part.node = info.incarnation, info.pid, info.node
        part.failures = 0
        if not part.up:
            log.info("%s is up (pid %d on %s) after %.1f s down", part.name, info.pid, info.node,
                     time.time() - part.since)
        self._set(part, True)
        part.next_ping = now + PING_EVERY_S

    def _recreate(self, part: Part) -> None:
        import ray

        part.recreate_at = None
        try:
            ray.kill(part.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        try:
            part.handle = part.make()
        except Exception as e:  # noqa: BLE001 - e.g. its name still held by the old one: try again later
            part.failures += 1
            part.recreate_at = time.monotonic() + self.backoff[part.kind].delay(part.failures)
            log.warning("creating %s again failed (%s); next try in %.1f s", part.name, one_line(e),
                        part.recreate_at - time.monotonic())
            return
        part.incarnation = None
        part.next_ping = 0.0
        self._count_restart(part, "created again")
        self._set(part, False, f"created again after: {part.reason}" if not part.reason.startswith("created")
                  else part.reason)

    def _count_restart(self, part: Part, how: str) -> None:
        part.restarts += 1
        self.metrics.actor_restarts.labels(part.kind).inc()
        log.warning("%s %s (restart %d)", part.name, how, part.restarts)

    def _set(self, part: Part, up: bool, reason: str = "") -> None:
        if up != part.up:
            part.since = time.time()
        part.up = up
        part.reason = reason or part.reason
        self.metrics.part_up.labels(part.name).set(1 if up else 0)

    def remove_all(self) -> None:
        """Kill every actor part for good (the daemon is stopping)."""
        import ray

        for part in self.parts.values():
            if part.make is not None and part.handle is not None:
                ray.kill(part.handle, no_restart=True)
                part.handle = None


def wait_for(what: str, attempt: Callable[[], T], transient: tuple[type[BaseException], ...], deadline: float,
             timeout_s: float, backoff: Backoff = STARTUP) -> T:
    """``attempt()`` until it returns, pausing after each ``transient`` failure (one log line per try);
    :class:`StartupError` once the monotonic ``deadline`` would pass. ``what`` is a verb phrase, e.g.
    ``"reach Redis at redis://..."``."""
    for n in range(1, 1_000_000):
        try:
            return attempt()
        except transient as e:
            pause = backoff.delay(n)
            left = deadline - time.monotonic()
            if pause > left:
                raise StartupError(f"could not {what} within CASCADE_STARTUP_TIMEOUT={timeout_s:g} s "
                                   f"(last error: {one_line(e)})") from None
            log.warning("could not %s (try %d: %s); trying again in %.0f s (%.0f s left of "
                        "CASCADE_STARTUP_TIMEOUT)", what, n, one_line(e), pause, left)
            time.sleep(pause)
    raise AssertionError("unreachable")


def one_line(e: BaseException) -> str:
    """An error in one line: its first line and, for a traceback (what a Ray task raised), its last."""
    lines = [ANSI_RE.sub("", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(e).__name__
    if len(lines) == 1:
        return lines[0][:300]
    return f"{lines[0][:150]} ... {lines[-1][:150]}"
