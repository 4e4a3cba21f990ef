"""Stream I/O in plain redis-py: the consumer group, reclaiming, dead letters, lag.

Delivery is at least once. ``StreamConsumer`` only reads, dead-letters and acknowledges; what may
be acknowledged (learned and checkpointed, dead-lettered, duplicate) is decided by its callers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import redis

Entry = tuple[str, dict[bytes, bytes]]
DEAD_FIELDS = ("source_id", "reason", "detail")


def connect(url: str, **kw) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` (TLS) or ``unix://`` URLs, password in the URL."""
    if not url.startswith("unix://"):
        kw.setdefault("socket_keepalive", True)
    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30, **kw)


def redact_url(url: str) -> str:
    """``url`` with everything before its last ``@`` (user and password) replaced by ``***``, for
    logs and error messages; safe for malformed URLs too (e.g. a password with an unescaped ``/``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _sid(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass
class GroupInfo:
    length: int
    lag: int
    pending: int


class StreamConsumer:
    def __init__(self, client: redis.Redis, stream: str, group: str, consumer: str,
                 claim_idle_ms: int = 60_000) -> None:
        self.r = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.dead_stream = f"{stream}:dead"
        self._own_pending_done = False
        self._next_claim = 0.0

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def read(self, count: int, block_ms: int | None, skip: set[str] = frozenset()) -> list[Entry]:
        """Up to ``count`` entries: first this consumer's own pending ones (after a restart), then
        entries idle in other consumers' pending lists, then new ones (waiting up to ``block_ms`` for
        them when there are none; ``None``: not waiting). Entries whose ids are in ``skip`` (already
        in flight here) are not returned again."""
        if not self._own_pending_done:
            got = self._xreadgroup("0", count, None)
            if len(got) < count:
                self._own_pending_done = True
            if got:
                return [e for e in got if e[0] not in skip]
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(1.0, self.claim_idle_ms / 4000)
            claimed = self._autoclaim(count)
            claimed = [e for e in claimed if e[0] not in skip]
            if claimed:
                return claimed
        return self._xreadgroup(">", count, block_ms)

    def _xreadgroup(self, start: str, count: int, block_ms: int | None) -> list[Entry]:
        resp = self.r.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count, block=block_ms)
        out: list[Entry] = []
        for _stream, entries in resp or []:
            for eid, fields in entries:
                if fields is None:  # deleted while pending: nothing to learn, nothing to keep
                    self.r.xack(self.stream, self.group, eid)
                    continue
                out.append((_sid(eid), fields))
        return out

    def _autoclaim(self, count: int) -> list[Entry]:
        resp = self.r.xautoclaim(self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms,
                                 start_id="0-0", count=count)
        # Redis 7 answers [next, entries, deleted]; 6.2 answers [next, entries].
        entries = resp[1] if len(resp) > 1 else []
        return [(_sid(eid), fields) for eid, fields in entries if fields is not None]

    def ack(self, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        return int(self.r.xack(self.stream, self.group, *entry_ids))

    def dead_letter(self, entry_id: str, fields: dict[bytes, bytes], reason: str, detail: str) -> None:
        """Copy an entry to ``<stream>:dead`` with its reason, then acknowledge it, in one transaction."""
        body: dict = {"source_id": entry_id, "reason": reason, "detail": detail}
        for k, v in fields.items():
            key = k.decode("utf-8", "replace")
            body[f"orig_{key}" if key in DEAD_FIELDS else k] = v
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, body)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()

    def info(self) -> GroupInfo:
        return group_info(self.r, self.stream, self.group)


def group_info(r: redis.Redis, stream: str, group: str) -> GroupInfo:
    """Length, lag and pending of ``group`` on ``stream`` (works on Redis 6.2 and 7)."""
    try:
        sinfo = r.xinfo_stream(stream)
    except redis.ResponseError:
        return GroupInfo(0, 0, 0)
    groups = {(_sid(g["name"])): g for g in r.xinfo_groups(stream)}
    g = groups.get(group)
    if g is None:
        return GroupInfo(int(sinfo["length"]), int(sinfo["length"]), 0)
    pending = int(g["pending"])
    lag = g.get("lag")
    if lag is None:  # Redis 6.2: count entries after the group's last delivered id (bounded)
        last = _sid(g["last-delivered-id"])
        if _id_tuple(last) >= _id_tuple(_sid(sinfo["last-generated-id"])):
            lag = 0
        else:
            lag = len(r.xrange(stream, min=f"({last}", max="+", count=100_000))
    return GroupInfo(int(sinfo["length"]), int(lag), pending)
