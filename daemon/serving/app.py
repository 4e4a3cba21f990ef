"""The HTTP routes (FastAPI) and the Ray Serve deployment that runs them: a thin layer that checks a request,
resolves its model to a version (``models``), hands it to the replica's decode thread (``batcher``), and answers
in OpenAI's shapes (``protocol``); feedback and interactions go through ``ingress``, downloads through ``exports``.
"""

import asyncio
import hmac
import json
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemon.config import Settings
from daemon.registry import LINEAGE_RE, Registry
from daemon.serving.batcher import Batcher, Job, Overloaded
from daemon.serving.exports import export_file, list_exports
from daemon.serving.ingress import Ingress, Served, item_fields
from daemon.serving.models import ModelCache, UnknownModel, list_models
from daemon.serving.protocol import (APIError, ChatRequest, CompletionRequest, FeedbackRequest, InteractionsRequest,
                                     completion_body, new_id, usage)
from daemon.serving.stats import stats_actor

log = logging.getLogger("cascade.serving")
app = FastAPI(title="cascade-lm", docs_url=None, redoc_url=None, openapi_url=None)
CHAT_DEFAULT_MAX_TOKENS = 256
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException):
    status = exc.status_code if exc.status_code in APIError.TYPES else 404
    err = APIError(status, "no such route" if exc.status_code == 404 else str(exc.detail), "not_found")
    return JSONResponse(err.body(), status_code=exc.status_code)


def sse(doc: dict | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


@serve.deployment(name="CascadeAPI")
@serve.ingress(app)
class CascadeAPI:
    def __init__(self, settings: Settings, redis_url: str) -> None:
        import torch

        torch.set_num_threads(max(1, int(settings.serve_cpus)))
        self.s = settings
        self.registry = Registry(settings.registry_root)
        self.cache = ModelCache(self.registry, settings.serve_cache_models,
                                "cuda" if torch.cuda.is_available() else "cpu")
        self.stats = stats_actor()
        self.batcher = Batcher(settings.serve_max_batch, settings.serve_max_queue, self._on_batch)
        self.ingress = Ingress(redis_url, settings.stream, settings.feedback_ttl, settings.feedback_max_items,
                               settings.max_entry_bytes)
        self.keys = settings.api_key_list()
        threading.Thread(target=self.cache.preload_forever, name="cascade-preload", daemon=True).start()

    # -- plumbing ----------------------------------------------------------------------------------
    def _on_batch(self, n: int) -> None:
        if self.stats is not None:
            self.stats.batch_size.remote(n)

    def _record(self, method: str, *args, **kw) -> None:
        if self.stats is not None:
            getattr(self.stats, method).remote(*args, **kw)

    def _lineage_label(self, name: str) -> str:
        """A lineage that exists, else "unknown": a label's values stay bounded whatever clients send."""
        lineage = name.partition("/")[0]
        return lineage if LINEAGE_RE.match(lineage) and self.registry.lineage(lineage).exists() else "unknown"

    def _auth(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest against every key: the time taken does not tell which key or how much of it matched.
        ok = scheme.lower() == "bearer" and any([hmac.compare_digest(token.encode(), k.encode()) for k in self.keys])
        if not ok:
            raise APIError(401, "missing or wrong API key (send Authorization: Bearer <key>)", "invalid_api_key")

    async def _body(self, request: Request, cls: type[BaseModel]):
        limit = self.s.serve_max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"body is {declared} bytes, over the {limit}-byte limit", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"body is over the {limit}-byte limit", "body_too_large")
        try:
            return cls.model_validate_json(bytes(body))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "body"
            raise APIError(400, f"{where}: {err['msg']}"[:500], "invalid_request") from None

    def _error(self, e: APIError, endpoint: str, lineage: str) -> JSONResponse:
        self._record("request", lineage, endpoint, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers())

    # -- models ------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._auth(request)
        except APIError as e:
            return self._error(e, "models", "unknown")
        names = await asyncio.to_thread(list_models, self.registry)
        self._record("request", "all", "models", 200)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "cascade"}
                                           for n in names]}

    # -- completions ---------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    async def _complete(self, request: Request, chat: bool):
        endpoint = "chat/completions" if chat else "completions"
        t0 = time.monotonic()
        lineage = "unknown"
        try:
            self._auth(request)
            req = await self._body(request, ChatRequest if chat else CompletionRequest)
            lineage = self._lineage_label(req.model)
            try:
                loaded = await asyncio.to_thread(self.cache.get, req.model)
                self.cache.note(req.model)
            except UnknownModel:
                raise APIError(404, f"the model {req.model[:200]!r} does not exist (GET /v1/models lists them)",
                               "model_not_found") from None
            job, prompt_text = self._job(req, loaded, chat)
            try:
                self.batcher.submit(job)
            except Overloaded as e:
                raise APIError(429, f"overloaded: {e}; try again shortly", "overloaded", retry_after=1) from None
        except APIError as e:
            return self._error(e, endpoint, lineage)
        cid = new_id("chatcmpl" if chat else "cmpl")
        deadline = t0 + self.s.serve_timeout_s
        meta = (cid, req.model, loaded.version.fingerprint, int(time.time()))
        done = lambda status, text: self._done(job, endpoint, lineage, status, t0, cid, prompt_text, text, req.model)  # noqa: E731
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(job, meta, chat, deadline, include_usage, done),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts = []
        try:
            async for kind, value in self._events(job, deadline):
                if kind == "text":
                    parts.append(value)
                elif kind == "error":
                    raise APIError(503, f"generation failed: {value}", "generation_failed", retry_after=1)
        except APIError as e:
            job.cancelled = True
            done(e.status, None)
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers())
        text = "".join(parts)
        done(200, text)
        body = completion_body(cid, req.model, meta[2], text, job.finish, chat, meta[3])
        body["usage"] = usage(len(job.prompt_ids), len(job.tokens))
        return body

    def _job(self, req, loaded, chat: bool) -> tuple[Job, str]:
        from learners.generate import Sampling

        tok = loaded.tokenizer
        if chat:
            prompt = tok.apply_chat_template([m.model_dump() for m in req.messages], add_generation_prompt=True,
                                             tokenize=False)
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        else:
            prompt = req.prompt
            ids = tok(prompt)["input_ids"]
        if not ids:  # an empty prompt: start from the beginning-of-text token
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        if len(ids) > self.s.serve_max_prompt_tokens:
            raise APIError(413, f"the prompt is {len(ids)} tokens, over the {self.s.serve_max_prompt_tokens}-token "
                           "limit", "prompt_too_long")
        cap = self.s.serve_max_tokens
        max_tokens = req.max_tokens or min(cap, CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        if max_tokens > cap:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's limit of {cap}", "max_tokens_too_large")
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed)
        return Job(loaded, ids, sampling, req.stop or [], asyncio.get_running_loop()), prompt

    async def _events(self, job: Job, deadline: float):
        while True:
            left = deadline - time.monotonic()
            try:
                kind, value = await asyncio.wait_for(job.events.get(), timeout=max(0.001, left))
            except asyncio.TimeoutError:
                raise APIError(503, f"the request took longer than {self.s.serve_timeout_s:g} s", "timeout",
                               retry_after=1) from None
            # Text that arrived meanwhile goes out as one event: a loaded replica sends fewer, larger chunks
            # (each one a message through Serve's proxy) instead of falling behind one token at a time.
            while kind == "text" and not job.events.empty():
                more_kind, more = job.events.get_nowait()
                if more_kind != "text":
                    yield kind, value
                    kind, value = more_kind, more
                    break
                value += more
            yield kind, value
            if kind in ("done", "error"):
                return

    async def _stream(self, job: Job, meta: tuple, chat: bool, deadline: float, include_usage: bool, done):
        cid, model, fingerprint, created = meta
        parts, first, status = [], True, 200
        try:
            try:
                async for kind, value in self._events(job, deadline):
                    if kind == "text":
                        parts.append(value)
                        yield sse(completion_body(cid, model, fingerprint, value, None, chat, created, True, first))
                        first = False
                    elif kind == "done":
                        yield sse(completion_body(cid, model, fingerprint, "", value, chat, created, True, first))
                    else:
                        status = 503
                        yield sse(APIError(503, f"generation failed: {value}", "generation_failed").body())
                if include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": created, "model": model, "system_fingerprint": fingerprint,
                               "choices": [], "usage": usage(len(job.prompt_ids), len(job.tokens))})
            except APIError as e:
                status = e.status
                yield sse(e.body())
            yield sse("[DONE]")
        finally:
            if job.finish is None:  # the client went away (or timed out): free its row in the batch
                job.cancelled = True
                status = 499 if status == 200 else status  # 499: the client closed the request
            done(status, "".join(parts) if status == 200 else None)

    def _done(self, job: Job, endpoint: str, lineage: str, status: int, t0: float, cid: str, prompt: str,
              text: str | None, model: str) -> None:
        v = job.loaded.version
        ttft = job.first_token_at - t0 if job.first_token_at else None
        live = (int(v.generation.split("-")[1]), v.step) if "/" not in model else None
        self._record("request", lineage, endpoint, status, len(job.prompt_ids), len(job.tokens), ttft,
                     time.monotonic() - t0, live)
        if text is not None and status == 200:
            served = Served(prompt=prompt, response=text, lineage=v.lineage, fingerprint=v.fingerprint)
            asyncio.get_running_loop().run_in_executor(None, self.ingress.keep, cid, served)

    # -- into the stream -----------------------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(self, request: Request):
        lineage = "unknown"
        try:
            self._auth(request)
            req = await self._body(request, FeedbackRequest)
            served = await asyncio.to_thread(self.ingress.feedback, req.id, req.reward, req.response)
            lineage = served.lineage
        except APIError as e:
            return self._error(e, "feedback", lineage)
        kind = "correction" if req.response is not None else "reward"
        self._record("feedback_item", lineage, kind)
        self._record("request", lineage, "feedback", 202)
        return JSONResponse({"object": "feedback", "id": f"feedback-{req.id}", "lineage": lineage,
                             "served": served.fingerprint, "accepted": True}, status_code=202)

    @app.post("/v1/interactions")
    async def interactions(self, request: Request):
        try:
            self._auth(request)
            req = await self._body(request, InteractionsRequest)
            items = [item_fields(x) for x in req.interactions]
            accepted, refused = await asyncio.to_thread(self.ingress.publish, items, new_id("req"))
        except APIError as e:
            return self._error(e, "interactions", "unknown")
        for it in accepted:
            self._record("feedback_item", self._lineage_label(it.lineage), "interaction")
        if refused:
            self._record("feedback_item", "unknown", "rejected", len(refused))
        self._record("request", "all", "interactions", 202)
        return JSONResponse({"object": "interactions", "accepted": len(accepted), "rejected": refused},
                            status_code=202)

    # -- exports -------------------------------------------------------------------------------------
    @app.get("/v1/exports/{lineage}")
    async def exports(self, lineage: str, request: Request):
        try:
            self._auth(request)
            doc = await asyncio.to_thread(list_exports, self.registry, lineage)
        except APIError as e:
            return self._error(e, "exports", "unknown")
        self._record("request", self._lineage_label(lineage), "exports", 200)
        return doc

    @app.get("/v1/exports/{lineage}/{name}")
    async def export_download(self, lineage: str, name: str, request: Request):
        try:
            self._auth(request)
            path, entry = await asyncio.to_thread(export_file, self.registry, lineage, name)
        except APIError as e:
            return self._error(e, "exports", "unknown")
        etag = f'"{entry.get("sha256", "")}"'
        self._record("request", self._lineage_label(lineage), "exports", 200)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return FileResponse(path, media_type="application/octet-stream", filename=name, headers={"ETag": etag})
