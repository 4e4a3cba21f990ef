"""The edge node (``cascade edge``): a small device that answers locally and feeds the big system.

It follows one lineage of a daemon's serving API:

* **pull** — every ``poll`` seconds it lists ``GET /v1/exports/<lineage>``; when the entry of its type has a new
  sha256 it downloads ``GET /v1/exports/<lineage>/<file>`` (``If-None-Match`` the file it has), checks the sha256,
  renames it into place and swaps llama.cpp onto it between two requests. An unchanged ETag costs one small list.
* **serve** — the same OpenAI-compatible shapes as the daemon (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``stream: true`` as server-sent events), answered by llama.cpp on this machine;
  ``system_fingerprint`` names the generation (``<lineage>/gen-NNNN@0``). It listens on 127.0.0.1 unless told.
* **feed back** — ``POST /v1/feedback`` on a completion it served turns it into an interaction (prompt, the
  response or the correction, reward, ``id`` derived from the completion id, ``meta.served``) written to an
  on-disk outbox *before* the 202; a sender posts the outbox to ``POST /v1/interactions`` in batches and deletes a
  batch only once the daemon answered 202. While the link is down the outbox grows and survives restarts (nothing
  lost); a batch resent after a lost answer carries the same ids, which the daemon learns at most once (nothing
  learned twice).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("cascade.edge")
MAX_BODY = 1 << 20
MAX_TOKENS = 512
BATCH = 64  # interactions per POST /v1/interactions (the API takes up to 1000 and 1 MiB)
SERVED_KEEP = 10_000  # completions kept open to feedback, the oldest dropped first
SERVED_TTL_S = 3600
MAX_MODEL_BYTES = 16 << 30  # a listed file larger than this is not downloaded
_FILE_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")


class EdgeError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class Served:
    prompt: str
    response: str
    fingerprint: str
    at: float


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Upstream:
    """The daemon's API: its exports and its ``/v1/interactions``."""

    def __init__(self, api: str, lineage: str, api_key: str | None, timeout: float = 30) -> None:
        self.api, self.lineage, self.timeout = api.rstrip("/"), lineage, timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _open(self, path: str, data: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.api + path, data=data, headers={**self.headers, **(headers or {})},
                                     method="POST" if data is not None else "GET")
        return urllib.request.urlopen(req, timeout=self.timeout)

    def exports(self) -> list[dict]:
        with self._open(f"/v1/exports/{self.lineage}") as r:
            return json.loads(r.read(MAX_BODY)).get("data", [])

    def download(self, name: str, etag: str | None, dest: Path, sha256: str, size: int) -> bool:
        """The file into ``dest`` (whole and checked, or not at all); False when the ETag still matches."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.tmp")
        try:
            with self._open(f"/v1/exports/{self.lineage}/{name}", headers={"If-None-Match": f'"{etag}"'} if etag else {}) as r, \
                    open(tmp, "wb") as f:
                digest, got = hashlib.sha256(), 0
                while chunk := r.read(1 << 20):
                    got += len(chunk)
                    if got > size:
                        raise OSError(f"{name}: the download is larger than the listed {size} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if digest.hexdigest() != sha256:
                raise OSError(f"{name}: downloaded sha256 {digest.hexdigest()[:12]} is not the listed {sha256[:12]}")
            os.replace(tmp, dest)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return False
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def send(self, items: list[dict]) -> dict:
        body = json.dumps({"interactions": items}).encode()
        with self._open("/v1/interactions", body, {"Content-Type": "application/json"}) as r:
            return json.loads(r.read(MAX_BODY))


class Outbox:
    """Interactions waiting for the daemon, one JSON file each, in the order they were made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()

    def put(self, item: dict) -> None:
        with self.lock:
            atomic_write(self.root / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json", json.dumps(item).encode())

    def peek(self, n: int) -> list[tuple[Path, dict]]:
        out = []
        for p in sorted(self.root.glob("*.json"))[:n]:
            try:
                out.append((p, json.loads(p.read_text(encoding="utf-8"))))
            except (OSError, ValueError):  # unreadable: keep it aside rather than lose or resend it forever
                p.rename(p.with_suffix(".bad"))
        return out

    def drop(self, paths: list[Path]) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(list(self.root.glob("*.json")))


class EdgeNode:
    def __init__(self, api: str, lineage: str, typ: str, home: Path, api_key: str | None = None,
                 threads: int = 2, n_ctx: int = 2048, poll_s: float = 30.0, flush_s: float = 5.0) -> None:
        self.lineage, self.type, self.threads, self.n_ctx = lineage, typ, threads, n_ctx
        self.poll_s, self.flush_s = poll_s, flush_s
        self.home = home
        (home / "models").mkdir(parents=True, exist_ok=True)
        self.upstream = Upstream(api, lineage, api_key)
        self.outbox = Outbox(home / "outbox")
        self.node = self._node_id()
        self.lock = threading.Lock()  # llama.cpp runs one request at a time; a swap waits for it
        self.llm = None
        self.chat_format = None
        self.current: dict = {}  # the export entry being served
        self.served: dict[str, Served] = {}
        self.downloads = self.sent = self.refused = 0
        self.link_up = False
        self.rounds: collections.Counter[str] = collections.Counter()  # background rounds: pull/flush, ok/failed
        self.stop_event = threading.Event()
        state = home / "state.json"
        if state.is_file():
            entry = json.loads(state.read_text())
            path = home / "models" / entry.get("file", "")
            if path.is_file():
                self._load(path, entry)

    def _node_id(self) -> str:
        path = self.home / "node-id"
        if not path.is_file():
            atomic_write(path, uuid.uuid4().hex[:12].encode())
        return path.read_text().strip()

    # -- models ----------------------------------------------------------------------------------
    def _load(self, path: Path, entry: dict) -> None:
        from gguf import GGUFReader
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from learners.export_check import load_llama

        trained_ctx = int(GGUFReader(str(path)).fields["llama.context_length"].contents())
        llm = load_llama(path, n_ctx=min(self.n_ctx, trained_ctx), n_threads=self.threads, logits_all=False)
        template = llm.metadata.get("tokenizer.chat_template")
        piece = lambda i: llm.detokenize([i], special=True).decode("utf-8", "replace") if i >= 0 else ""  # noqa: E731
        chat_format = Jinja2ChatFormatter(template, piece(llm.token_eos()), piece(llm.token_bos())) if template else None
        with self.lock:  # waits for the request in flight
            old, self.llm, self.current, self.chat_format = self.llm, llm, entry, chat_format
            if old is not None:
                old.close()
        log.info("edge: serving %s (%s)", entry["generation"], entry["file"])

    def pull(self) -> bool:
        """Follow the lineage's current export of our type; True when a new one was loaded."""
        entries = [e for e in self.upstream.exports() if e.get("format") == "gguf" and e.get("type") == self.type]
        if not entries:
            return False
        entry = entries[0]
        if entry.get("sha256") == self.current.get("sha256"):
            return False
        if not _FILE_RE.match(str(entry.get("file"))) or not 0 < int(entry.get("bytes") or 0) <= MAX_MODEL_BYTES:
            raise ValueError(f"refusing the listed export {str(entry)[:200]}: bad file name or size")
        dest = self.home / "models" / entry["file"]
        if not self.upstream.download(entry["file"], self.current.get("sha256"), dest, entry["sha256"],
                                      int(entry["bytes"])):
            return False
        self.downloads += 1
        old = self.home / "models" / self.current["file"] if self.current else None
        self._load(dest, entry)
        atomic_write(self.home / "state.json", json.dumps(entry).encode())
        if old is not None and old != dest:
            old.unlink(missing_ok=True)
        return True

    # -- serving ---------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        return f"{self.current['generation']}@0"

    def models(self) -> dict:
        if not self.current:
            return {"object": "list", "data": []}
        owned = {"object": "model", "created": 0, "owned_by": f"cascade-edge:{self.node}"}
        return {"object": "list", "data": [{"id": self.lineage, **owned}, {"id": self.current["generation"], **owned}]}

    def _check(self, body: dict) -> dict:
        if self.llm is None:
            raise EdgeError(503, f"no generation of lineage {self.lineage} downloaded yet", "model_not_ready")
        if body.get("model") not in (self.lineage, self.current["generation"]):
            raise EdgeError(404, f"this edge node serves {self.lineage} ({self.current['generation']}) only",
                            "model_not_found")
        max_tokens = body.get("max_tokens", 16)
        if not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
            raise EdgeError(400, f"max_tokens must be an integer in [1, {MAX_TOKENS}]", "invalid_max_tokens")
        opts = {"max_tokens": max_tokens, "temperature": float(body.get("temperature", 1.0)),
                "top_p": float(body.get("top_p", 1.0)), "stream": bool(body.get("stream", False))}
        if body.get("stop") is not None:
            opts["stop"] = body["stop"]
        if body.get("seed") is not None:
            opts["seed"] = int(body["seed"])
        return opts

    def complete(self, body: dict, chat: bool):
        """The answer (a dict), or with ``stream`` an iterator of chunks; the completion is kept for feedback.

        A chat is rendered with the file's own chat template (as the daemon renders it with the tokenizer's),
        and that text is the prompt kept with the answer. llama.cpp answers one request at a time, and a request
        finishes on the weights it started with (a new generation is swapped in between two requests)."""
        opts = self._check(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise EdgeError(400, "messages must be a non-empty list of {role, content}", "invalid_messages")
            if self.chat_format is None:
                raise EdgeError(400, f"{self.current['generation']} has no chat template", "no_chat_template")
        elif not isinstance(body.get("prompt"), str):
            raise EdgeError(400, "prompt must be a string", "invalid_prompt")
        cid = f"{'chatcmpl' if chat else 'cmpl'}-edge-{uuid.uuid4().hex}"
        stream = opts["stream"]

        def shape(out: dict, head: dict, first: bool) -> dict:
            if not chat:
                return {**out, **head}
            c = out["choices"][0]
            if stream:
                delta = {"role": "assistant", "content": c["text"]} if first else {"content": c["text"]}
                return {**out, **head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": c.get("finish_reason")}]}
            return {**out, **head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": c["text"]},
                 "finish_reason": c.get("finish_reason")}]}

        def generate():
            with self.lock:
                fp = self.fingerprint()
                prompt = self.chat_format(messages=body["messages"]).prompt if chat else body["prompt"]
                head = {"id": cid, "model": body["model"], "system_fingerprint": fp}
                out = self.llm.create_completion(prompt=prompt, top_k=0, min_p=0.0, **opts)
                parts = []
                for i, c in enumerate(out if stream else [out]):
                    parts.append(c["choices"][0]["text"])
                    yield shape(c, head, i == 0)
            self.served[cid] = Served(prompt, "".join(parts), fp, time.time())
            while len(self.served) > SERVED_KEEP:
                self.served.pop(next(iter(self.served)))

        if stream:
            return generate()
        answer, = list(generate())
        return answer

    def feedback(self, body: dict) -> dict:
        cid, reward, correction = body.get("id"), body.get("reward", 1), body.get("response")
        if not isinstance(cid, str) or not isinstance(reward, (int, float)) or isinstance(reward, bool) \
                or not -1 <= reward <= 1 or (correction is not None and not isinstance(correction, str)):
            raise EdgeError(400, "feedback is {id, reward in [-1, 1], response?: string}", "invalid_feedback")
        served = self.served.get(cid)
        if served is None or time.time() - served.at > SERVED_TTL_S:
            raise EdgeError(404, f"no served completion {cid[:100]!r} (unknown or expired)", "completion_not_found")
        item = {"prompt": served.prompt, "response": correction if correction is not None else served.response,
                "lineage": self.lineage, "reward": 1 if correction is not None and "reward" not in body else reward,
                "id": f"edge-{self.node}-{cid}", "meta": {"served": served.fingerprint, "edge": self.node}}
        self.outbox.put(item)  # on disk before the 202: a crash now loses nothing
        return {"object": "feedback", "id": f"feedback-{cid}", "lineage": self.lineage,
                "served": served.fingerprint, "accepted": True}

    # -- sending ---------------------------------------------------------------------------------
    def flush(self) -> int:
        """Post the outbox in batches until it is empty or the link fails; returns interactions delivered."""
        delivered = 0
        while batch := self.outbox.peek(BATCH):
            reply = self.upstream.send([item for _, item in batch])
            for r in reply.get("rejected", []):
                log.warning("edge: the daemon refused interaction %s: %s (%s)",
                            batch[r["index"]][1].get("id"), r.get("reason"), r.get("detail"))
            self.outbox.drop([p for p, _ in batch])
            self.sent += int(reply.get("accepted", 0))
            self.refused += len(reply.get("rejected", []))
            delivered += len(batch)
        return delivered

    def health(self) -> dict:
        return {"status": "ok" if self.llm is not None else "waiting", "lineage": self.lineage, "node": self.node,
                "generation": self.current.get("generation"), "file": self.current.get("file"),
                "downloads": self.downloads, "outbox": len(self.outbox), "sent": self.sent, "refused": self.refused,
                "link_up": self.link_up, "polls": self.rounds["pull ok"] + self.rounds["pull failed"],
                "send_failures": self.rounds["flush failed"]}

    def _loop(self, every: float, fn, what: str) -> None:
        while not self.stop_event.is_set():
            try:
                fn()
                self.link_up = True
                self.rounds[f"{fn.__name__} ok"] += 1
            except Exception as e:  # noqa: BLE001 - the link or the daemon is down: try again later, never die
                self.link_up = False
                self.rounds[f"{fn.__name__} failed"] += 1
                log.warning("edge: %s failed (will retry): %s", what, e)
            self.stop_event.wait(every)

    def start_background(self) -> None:
        for every, fn, what in ((self.poll_s, self.pull, "pulling the current export"),
                                (self.flush_s, self.flush, "sending interactions")):
            threading.Thread(target=self._loop, args=(every, fn, what), daemon=True, name=what).start()

    def close(self) -> None:
        self.stop_event.set()
        with self.lock:
            if self.llm is not None:
                self.llm.close()
                self.llm = None


def make_server(node: EdgeNode, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, doc: dict, headers: dict | None = None) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, e: EdgeError) -> None:
            self._send(e.status, {"error": {"message": str(e), "type": "invalid_request_error"
                                            if e.status < 500 else "server_error", "code": e.code}})

        def do_GET(self):  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/v1/models":
                self._send(200, node.models())
            elif path == "/healthz":
                h = node.health()
                self._send(200 if h["status"] == "ok" else 503, h)
            else:
                self._error(EdgeError(404, f"no route {path[:100]}", "not_found"))

        def do_POST(self):  # noqa: N802
            path = self.path.split("?")[0]
            try:
                size = int(self.headers.get("Content-Length") or 0)
                if size > MAX_BODY:
                    raise EdgeError(413, f"request body over {MAX_BODY} bytes", "body_too_large")
                try:
                    body = json.loads(self.rfile.read(size) or b"{}")
                except ValueError:
                    raise EdgeError(400, "the body is not JSON", "invalid_json") from None
                if not isinstance(body, dict):
                    raise EdgeError(400, "the body must be a JSON object", "invalid_json")
                if path == "/v1/feedback":
                    return self._send(202, node.feedback(body))
                if path not in ("/v1/completions", "/v1/chat/completions"):
                    raise EdgeError(404, f"no route {path[:100]}", "not_found")
                out = node.complete(body, chat=path == "/v1/chat/completions")
            except EdgeError as e:
                return self._error(e)
            except (TypeError, ValueError) as e:
                return self._error(EdgeError(400, f"bad request: {e}", "invalid_request"))
            if isinstance(out, dict):
                return self._send(200, out)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for chunk in out:
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except OSError:  # the client went away
                pass
            finally:
                out.close()  # ends the generation and frees llama.cpp for the next request

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def run_edge(api: str, lineage: str, typ: str, home: Path, host: str = "127.0.0.1", port: int = 8080,
             api_key: str | None = None, threads: int = 2, poll_s: float = 30.0, flush_s: float = 5.0) -> int:
    import signal

    node = EdgeNode(api, lineage, typ, home, api_key, threads, poll_s=poll_s, flush_s=flush_s)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("edge: listening on %s exposes this node beyond the machine (no authentication)", host)
    server = make_server(node, host, port)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    node.start_background()
    log.info("edge: %s on http://%s:%d following %s at %s", node.node, host, server.server_address[1], lineage, api)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        node.close()
    return 0
