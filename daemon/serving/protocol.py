"""What crosses the API's boundary: request bodies (validated, bounded), response bodies, and errors in OpenAI's
shape ``{"error": {"message", "type", "code"}}``."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered as ``status`` with OpenAI's error body (and ``Retry-After`` when set)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"), "code": self.code,
                          "param": None}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class _Body(BaseModel):
    # Fields OpenAI clients send that this server does not use (n=1, logprobs, user, ...) are accepted
    # and ignored, as vLLM does, so tools work unchanged.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop: at most {MAX_STOP} non-empty strings of at most {MAX_STOP_CHARS} characters")
        return items

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if v is None else v


class CompletionRequest(_Body):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt: one prompt per request (a string, or a list of one string)")
            return v[0]
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1, max_length=256)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=100)
    reward: float | None = Field(None, ge=-1.0, le=1.0)
    response: str | None = Field(None, min_length=1)


class InteractionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interactions: list[Any] = Field(min_length=1, max_length=1000)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, fingerprint: str, text: str, finish: str | None, chat: bool,
                    created: int | None = None, chunk: bool = False, first: bool = False) -> dict:
    """A whole response (``chunk=False``) or one streamed chunk, for /v1/completions or /v1/chat/completions."""
    if chat:
        key = "delta" if chunk else "message"
        content: dict = {"role": "assistant", "content": text} if (first or not chunk) else {"content": text}
        choice = {"index": 0, key: content, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": cid, "object": obj, "created": created or int(time.time()), "model": model,
            "system_fingerprint": fingerprint, "choices": [choice]}
