"""Into the stream over HTTP: served completions kept for feedback, feedback turned into an interaction, and
interactions published by producers without Redis.

One way in: every item is checked by ``daemon.schema.parse_entry`` exactly as a stream entry is. A refused item
goes to ``<stream>:dead`` with the same fields a refused stream entry gets (``source_id`` is ``http:<request
id>/<index>``, as it never had a stream id); an accepted one is XADDed to ``CASCADE_STREAM``, where the daemon
checks it again and learns its ``id`` at most once (its ledger). Feedback's ``id`` is ``feedback-<completion id>``,
so however often one completion gets feedback, it is learned from once.

Served completions live in Redis under ``<stream>:served:<completion id>`` for ``CASCADE_FEEDBACK_TTL`` seconds,
each at most ``CASCADE_MAX_ENTRY_BYTES`` (longer ones are not kept: they could not become an entry) and at most
``CASCADE_FEEDBACK_MAX_ITEMS`` of them (the oldest dropped first, through the index ``<stream>:served``). With
Redis down, a completion is still answered (it is just not kept), and feedback/interactions get ``503`` with
``Retry-After``: nothing is buffered in a replica, which could die with it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from daemon.schema import Interaction, Rejection, parse_entry
from daemon.stream import DEAD_FIELDS, connect
from daemon.serving.protocol import APIError

RETRY_AFTER_S = 5
# The reason a stream entry would get for a field of the wrong JSON type ("bad_body": an item not an object).
TYPE_REASONS = {"prompt": "bad_text", "response": "bad_text", "lineage": "bad_lineage", "reward": "bad_reward",
                "id": "bad_id", "meta": "bad_meta"}


@dataclass
class Served:
    prompt: str
    response: str
    lineage: str
    fingerprint: str


def item_fields(item) -> dict[bytes, bytes] | Rejection:
    """A JSON item as the stream fields a producer would XADD (numbers as text, ``meta`` as JSON)."""
    if not isinstance(item, dict):
        return Rejection("", "bad_body", "an interaction must be a JSON object")
    out = {}
    for k, v in item.items():
        if k == "meta" and isinstance(v, dict):
            v = json.dumps(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            v = repr(v)
        elif not isinstance(v, str):
            return Rejection("", TYPE_REASONS.get(k, "unknown_field"),
                             f"field {str(k)[:40]!r} must be a string (or a number; meta may be an object)")
        try:
            out[str(k).encode()] = v.encode("utf-8")
        except UnicodeEncodeError:
            return Rejection("", "bad_text", f"field {str(k)[:40]!r} contains a lone surrogate")
    return out


class Ingress:
    def __init__(self, redis_url: str, stream: str, ttl_s: int, max_items: int, max_entry_bytes: int) -> None:
        self.r = connect(redis_url, socket_timeout=2)
        self.stream, self.ttl_s, self.max_items, self.max_entry_bytes = stream, ttl_s, max_items, max_entry_bytes
        self.index = f"{stream}:served"

    def _key(self, completion_id: str) -> str:
        return f"{self.stream}:served:{completion_id}"

    # -- served completions ------------------------------------------------------------------------
    def keep(self, completion_id: str, served: Served) -> bool:
        """Keep a served completion open to feedback; False when it is too large or Redis is unreachable."""
        doc = json.dumps(vars(served))
        if len(doc.encode()) > self.max_entry_bytes:
            return False
        now = time.time()
        try:
            pipe = self.r.pipeline(transaction=True)
            pipe.set(self._key(completion_id), doc, ex=self.ttl_s)
            pipe.zadd(self.index, {completion_id: now})
            pipe.zremrangebyscore(self.index, "-inf", now - self.ttl_s)
            pipe.zcard(self.index)
            n = pipe.execute()[-1]
            if n > self.max_items:  # the oldest beyond the bound go first
                extra = [m.decode() for m, _ in self.r.zpopmin(self.index, n - self.max_items)]
                self.r.delete(*(self._key(m) for m in extra))
            return True
        except redis.RedisError:
            return False

    def served(self, completion_id: str) -> Served:
        try:
            raw = self.r.get(self._key(completion_id))
        except redis.RedisError as e:
            raise APIError(503, f"feedback is unavailable: Redis is unreachable ({type(e).__name__})",
                           "redis_unavailable", RETRY_AFTER_S) from None
        if raw is None:
            raise APIError(404, f"no served completion {completion_id!r} (unknown, or older than the feedback TTL)",
                           "completion_not_found")
        return Served(**json.loads(raw))

    # -- into the stream ---------------------------------------------------------------------------
    def feedback(self, completion_id: str, reward: float | None, correction: str | None) -> Served:
        """The interaction a piece of feedback makes, published; raises APIError."""
        if reward is None and correction is None:
            raise APIError(400, "feedback needs a reward, a corrected response, or both", "bad_feedback")
        s = self.served(completion_id)
        fields = {"prompt": s.prompt, "response": correction if correction is not None else s.response,
                  "lineage": s.lineage, "reward": repr(1.0 if reward is None else float(reward)),
                  "id": f"feedback-{completion_id}", "meta": json.dumps({"served": s.fingerprint})}
        accepted, refused = self.publish([{k.encode(): v.encode() for k, v in fields.items()}], completion_id)
        if refused:
            raise APIError(400, f"the feedback makes an invalid interaction: {refused[0]['detail']}",
                           refused[0]["reason"])
        return s

    def publish(self, items: list[dict[bytes, bytes] | Rejection], request_id: str) -> tuple[list[Interaction], list[dict]]:
        """Check each item as a stream entry; XADD the good ones, dead-letter the rest (one transaction)."""
        accepted, refused = [], []
        pipe = self.r.pipeline(transaction=True)
        for i, fields in enumerate(items):
            source = f"http:{request_id}/{i}"
            parsed = fields if isinstance(fields, Rejection) else parse_entry(source, fields, self.max_entry_bytes)
            if isinstance(parsed, Rejection):
                refused.append({"index": i, "reason": parsed.reason, "detail": parsed.detail})
                body: dict = {"source_id": source, "reason": parsed.reason, "detail": parsed.detail}
                if not isinstance(fields, Rejection):
                    for k, v in fields.items():
                        key = k.decode("utf-8", "replace")
                        body[f"orig_{key}" if key in DEAD_FIELDS else k] = v
                pipe.xadd(f"{self.stream}:dead", body)
            else:
                accepted.append(parsed)
                pipe.xadd(self.stream, fields)
        try:
            pipe.execute()
        except redis.RedisError as e:
            raise APIError(503, f"cannot publish: Redis is unreachable ({type(e).__name__})", "redis_unavailable",
                           RETRY_AFTER_S) from None
        return accepted, refused
