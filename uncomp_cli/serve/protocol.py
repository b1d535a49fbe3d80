"""The OpenAI HTTP API as far as ``uncomp serve`` speaks it: request bodies, responses, errors.

Requests are checked here, before anything reaches the model: a field the server does not
support, or supports only at its neutral value (``n`` other than 1, a penalty other than 0,
``logprobs``, tools), is refused with HTTP 400 and OpenAI's error object rather than ignored, so a
client never gets an answer to a question it did not ask. UNComp's own settings come in the
extra body field ``uncomp`` (what the ``openai`` client sends with ``extra_body``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

#: Most stop sequences a request may give (OpenAI's limit).
MAX_STOPS = 4

#: Fields taken only at the neutral values clients send by default; anything else is refused.
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "n": ((1,), "only n=1 is supported"),
    "presence_penalty": ((None, 0), "penalties are not supported; send 0 or leave it out"),
    "frequency_penalty": ((None, 0), "penalties are not supported; send 0 or leave it out"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "logprobs": ((None, False), "logprobs are not supported"),
    "tools": ((None, []), "tools are not supported"),
    "tool_choice": ((None, "none"), "tool_choice is not supported"),
    "echo": ((False,), "echo is not supported"),
    "suffix": ((None, ""), "suffix is not supported"),
    "best_of": ((None, 1), "best_of is not supported"),
}


class ApiError(Exception):
    """An error the client gets as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def server_error(message: str) -> ApiError:
    return ApiError(message, status=500, type="server_error", code="internal_error")


class _Request(BaseModel):
    """Fields both endpoints take. Unknown fields are refused (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    #: UNComp's settings for this request: ``method`` and the method's options (``budget``, ...).
    uncomp: dict[str, Any] | None = None

    @field_validator(*NEUTRAL, check_fields=False)
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        allowed, message = NEUTRAL[info.field_name]
        if value not in allowed:
            raise ValueError(message)
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence is empty")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value and value.get("type") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported")
        return value

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict]:
        """The messages as a chat template takes them ("developer" is the newer name of "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("send one prompt per request")
            value = value[0]
        return value

    def limit(self) -> int | None:
        return self.max_tokens


def parse_request(kind: type[_Request], body: bytes) -> _Request:
    """Validate a JSON body; any problem becomes one :class:`ApiError` naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError("the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = f"unsupported field '{where}'"
        elif first["type"] == "missing":
            message = f"missing field '{where}'"
        else:
            message = f"{where}: {message}"
        raise ApiError(message, param=str(first["loc"][0]) if first["loc"] else None) from None


# -- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(chat: bool, request_id: str, model: str, text: str, finish_reason: str, counts: dict,
                    served: dict) -> dict:
    """A whole (non-streamed) response; ``served``: how uncomp served it (method, budget, cache)."""
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": counts, "uncomp": served}


def chunk_body(chat: bool, request_id: str, model: str, text: str | None, finish_reason: str | None = None,
               first: bool = False, extra: dict | None = None) -> dict:
    """One streamed chunk; ``text=None`` with ``finish_reason`` is the last one, ``first`` carries the role."""
    if chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], **(extra or {})}
