"""The OpenAI HTTP API as far as ``uncomp serve`` speaks it: request bodies, responses, errors.

Requests are checked here, before anything reaches the model. Every field of OpenAI's request
bodies is in :data:`FIELDS` with what the server does with it: supported, accepted and ignored
(only where OpenAI itself does nothing with it that changes the answer), or taken only at its
neutral value (``n: 1``, penalties 0, no tools) and refused otherwise, with HTTP 400 and OpenAI's
error object naming the field — so a client never gets an answer to a question it did not ask.
A field that is in none of them is refused the same way. UNComp's own settings come in the extra
body field ``uncomp`` (what the ``openai`` client sends with ``extra_body``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: Most stop sequences a request may give (OpenAI's limit).
MAX_STOPS = 4

#: Most alternatives per token a request may ask for: chat's ``top_logprobs``, completions' ``logprobs``.
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

SUPPORTED = "supported"
IGNORED = "ignored"

#: Every field of OpenAI's ``/v1/chat/completions`` and ``/v1/completions`` request bodies (as the
#: ``openai`` client 3.60 declares them), and what this server does with it: ``(SUPPORTED, what)``;
#: ``(IGNORED, why)``, accepted and ignored because OpenAI itself uses it for nothing that changes
#: the answer; or ``(values, message)``, taken only at those neutral values (``null`` always means
#: "the default", and is taken too) and refused otherwise with ``message``. Which endpoint takes a
#: field is said by :class:`ChatRequest` and :class:`CompletionRequest`; any other field is refused.
FIELDS: dict[str, tuple[str | tuple, str]] = {
    # -- taken and acted on
    "model": (SUPPORTED, "the served model's name (another: 404 model_not_found)"),
    "messages": (SUPPORTED, "roles system, developer (= system), user, assistant; text content; a message's "
                            "name where the chat template carries it"),
    "prompt": (SUPPORTED, "a string, or a list of one string"),
    "max_tokens": (SUPPORTED, "left out: --default-max-tokens, or what the context leaves"),
    "max_completion_tokens": (SUPPORTED, "the newer name of max_tokens"),
    "temperature": (SUPPORTED, "left out: the model's generation_config, else 0 (greedy); see sampling_defaults"),
    "top_p": (SUPPORTED, "left out: the model's generation_config, else 1"),
    "seed": (SUPPORTED, "a seeded request gets the same tokens alone or among others"),
    "stop": (SUPPORTED, f"up to {MAX_STOPS} sequences"),
    "stream": (SUPPORTED, "server-sent events"),
    "stream_options": (SUPPORTED, "only with stream: true; include_usage, and include_obfuscation: false"),
    "logprobs": (SUPPORTED, f"chat: true (with top_logprobs 0-{MAX_TOP_LOGPROBS}); completions: 0-"
                            f"{MAX_COMPLETION_LOGPROBS} alternatives"),
    "top_logprobs": (SUPPORTED, f"0-{MAX_TOP_LOGPROBS}, with logprobs: true"),
    "uncomp": (SUPPORTED, "UNComp's settings for this request: method and its options"),
    "ignore_eos": (SUPPORTED, "vLLM's extension: true keeps generating past the end-of-sequence token, to "
                              "max_tokens or a stop sequence (benchmarks ask for fixed answer lengths)"),
    # -- accepted and ignored: OpenAI uses them for nothing that changes the answer
    "user": (IGNORED, "OpenAI uses it to detect abuse and to route requests to its prompt cache"),
    "safety_identifier": (IGNORED, "OpenAI uses it to detect abuse"),
    "prompt_cache_key": (IGNORED, "OpenAI uses it to route requests to its prompt cache; this server finds a "
                                  "reusable context by its tokens"),
    "metadata": (IGNORED, "tags OpenAI attaches to the completions it stores (store: true)"),
    # -- taken only at their neutral values
    "n": ((1,), "only n=1 is supported"),
    "presence_penalty": ((0,), "penalties are not supported; send 0 or leave it out"),
    "frequency_penalty": ((0,), "penalties are not supported; send 0 or leave it out"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "tools": (([],), "tools are not supported"),
    "tool_choice": (("none",), "tool_choice is not supported"),
    "parallel_tool_calls": ((), "parallel_tool_calls applies to tools, which are not supported"),
    "functions": ((), "functions (the older form of tools) are not supported"),
    "function_call": (("none",), "function_call (the older form of tool_choice) is not supported"),
    "response_format": (({"type": "text"},), "only response_format {'type': 'text'} is supported"),
    "modalities": ((["text"],), "only the text modality is supported"),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "reasoning_effort applies to reasoning models; this model has no such setting"),
    "verbosity": ((), "verbosity is not supported"),
    "web_search_options": ((), "web search is not supported"),
    "moderation": ((), "moderation is not supported"),
    "store": ((False,), "this server stores no completions; send false or leave it out"),
    "service_tier": (("auto", "default"), "this server has one service tier; send auto or default, or leave it out"),
    "prompt_cache_retention": (("in_memory",), "reusable contexts are kept in this server's memory "
                                               "(--context-cache), no longer; send in_memory or leave it out"),
    "prompt_cache_options": ((), "prompt_cache_options is not supported; reusable contexts are found by their "
                                 "tokens"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "suffix is not supported"),
    "best_of": ((1,), "best_of is not supported"),
}

#: The fields taken only at neutral values: ``name -> (values, message)``.
NEUTRAL: dict[str, tuple[tuple, str]] = {name: rule for name, rule in FIELDS.items() if isinstance(rule[0], tuple)}


def _same(value: Any, neutral: Any) -> bool:
    """Equal and of the same kind: ``0`` is not ``false``, ``1.0`` is ``1``."""
    def kind(x: Any) -> type:
        return float if isinstance(x, (int, float)) and not isinstance(x, bool) else type(x)

    return kind(value) is kind(neutral) and value == neutral


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


def shutting_down(message: str = "the server is shutting down") -> ApiError:
    """What a request the server will not finish gets while it stops (503)."""
    return ApiError(message, status=503, type="server_error", code="shutting_down")


def too_large(limit: int) -> ApiError:
    return ApiError(f"the request body is larger than this server's limit of {limit} bytes (--max-body)",
                    status=413, code="request_too_large")


class StreamOptions(BaseModel):
    """``stream_options``: its keys as OpenAI's; any other is refused."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None
    include_obfuscation: StrictBool | None = None

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("stream obfuscation is not implemented; send false or leave it out")
        return value


class _Request(BaseModel):
    """Fields both endpoints take. Unknown fields are refused (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: the server's default (sampling_defaults)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Any = 1
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    #: vLLM's extension: generate past the end-of-sequence token (fixed answer lengths for benchmarks).
    ignore_eos: StrictBool | None = None  # null: the default (false), as for every field
    #: UNComp's settings for this request: ``method`` and the method's options (``budget``, ...).
    uncomp: dict[str, Any] | None = None

    @field_validator(*NEUTRAL, mode="before", check_fields=False)
    @classmethod
    def _neutral(cls, value: Any, info: ValidationInfo) -> Any:
        allowed, message = NEUTRAL[info.field_name]
        if value is not None and not any(_same(value, a) for a in allowed):
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

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> _Request:
        # an ApiError, not a ValueError: pydantic lets it through, with the field it is about
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options is only allowed when stream is true", param="stream_options")
        return self

    def stops(self) -> list[str]:
        return list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat message: role, text content and, where the chat template carries it, a name (the
    planner refuses a name the template would drop). Other fields (tool calls, audio) are refused."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # accepted and ignored (FIELDS says why)
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    # neutral values only
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError("top_logprobs is only allowed when logprobs is true", param="top_logprobs")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self, names: bool = False) -> list[dict]:
        """The messages as a chat template takes them ("developer" is the newer name of "system");
        ``names``: with each message's name, for a template that carries it."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                | ({"name": m.name} if names and m.name is not None else {}) for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

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


def request_logprobs(request: _Request) -> int | None:
    """How many alternatives per token a request asks for with its log probabilities (0: the
    chosen token's only); None: no log probabilities."""
    if isinstance(request, ChatRequest):
        return (request.top_logprobs or 0) if request.logprobs else None
    return getattr(request, "logprobs", None)


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
                    served: dict, logprobs: dict | None = None) -> dict:
    """A whole (non-streamed) response; ``served``: how uncomp served it (method, budget, cache);
    ``logprobs``: the choice's, when asked for (:mod:`uncomp_cli.serve.logprobs` makes them)."""
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": logprobs}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": counts, "uncomp": served}


def chunk_body(chat: bool, request_id: str, model: str, text: str | None, finish_reason: str | None = None,
               first: bool = False, extra: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed chunk; ``text=None`` with ``finish_reason`` is the last one, ``first`` carries the role;
    ``logprobs``: those of the tokens this chunk carries, when asked for."""
    if chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], **(extra or {})}
