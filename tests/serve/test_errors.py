"""Bad input gets an OpenAI error object and never takes the server down; every OpenAI field the
server does not act on is refused by name, not ignored; a body over the limit gets 413; overload
gets 429; a failing batch fails its own requests only; a client that leaves frees its row."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving import MODEL, metric, start_server

from uncomp_cli.serve.protocol import (
    FIELDS,
    IGNORED,
    NEUTRAL,
    ApiError,
    ChatRequest,
    CompletionRequest,
    parse_request,
)
from uncomp_cli.serve.server import ServeSettings

HELLO = [{"role": "user", "content": "hello"}]

BAD_BODIES = {
    "missing messages": ({"model": MODEL}, "messages"),
    "empty messages": ({"model": MODEL, "messages": []}, "messages"),
    "n > 1": ({"model": MODEL, "messages": HELLO, "n": 2}, "n"),
    "unknown field": ({"model": MODEL, "messages": HELLO, "temprature": 0}, "temprature"),
    "tools": ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
    "penalty": ({"model": MODEL, "messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
    "stream_options without stream": ({"model": MODEL, "messages": HELLO, "stream_options": {"include_usage": True}},
                                      "stream_options"),
    "stream_options with stream false": ({"model": MODEL, "messages": HELLO, "stream": False,
                                          "stream_options": {"include_usage": True}}, "stream_options"),
    "unknown stream option": ({"model": MODEL, "messages": HELLO, "stream": True,
                               "stream_options": {"include_usage": True, "chunk_size": 4}}, "stream_options"),
    "stream obfuscation": ({"model": MODEL, "messages": HELLO, "stream": True,
                            "stream_options": {"include_obfuscation": True}}, "stream_options"),
    "top_logprobs without logprobs": ({"model": MODEL, "messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    "too many top_logprobs": ({"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": 21},
                              "top_logprobs"),
    "a message's name": ({"model": MODEL, "messages": [{"role": "user", "content": "hi", "name": "ann"}]},
                         "messages"),
    "a tool call in a message": ({"model": MODEL, "messages": [*HELLO, {"role": "assistant", "content": None,
                                                                        "tool_calls": []}]}, "messages"),
    "five stops": ({"model": MODEL, "messages": HELLO, "stop": list("abcde")}, "stop"),
    "zero max_tokens": ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    "bad role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    "image content": ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
                      "messages"),
    "unknown method": ({"model": MODEL, "messages": HELLO, "uncomp": {"method": "zip"}}, "uncomp"),
    "bad budget": ({"model": MODEL, "messages": HELLO, "uncomp": {"budget": "lots"}}, "uncomp"),
    "budget of a wrong type": ({"model": MODEL, "messages": HELLO, "uncomp": {"window": "wide"}}, "uncomp"),
    "foreign option": ({"model": MODEL, "messages": HELLO, "uncomp": {"sinks": 4}}, "uncomp"),
    "over the context": ({"model": MODEL, "messages": [{"role": "user", "content": "hello world " * 1200}]},
                         "messages"),
    "max_tokens over the context": ({"model": MODEL, "messages": HELLO, "max_tokens": 5000}, "messages"),
    "only a system message": ({"model": MODEL, "messages": [{"role": "system", "content": "be brief"}]},
                              "messages"),
}


def _ok(running) -> None:
    response = running.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0)
    assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_requests_get_400_with_an_openai_error_and_the_server_goes_on(running, name):
    body, param = BAD_BODIES[name]
    response = httpx.post(running.url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    _ok(running)


#: A value OpenAI takes and this server does not, for each field taken only at its neutral values.
NOT_NEUTRAL = {
    "n": 2, "presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"42": 10},
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto", "parallel_tool_calls": False,
    "functions": [{"name": "f"}], "function_call": "auto", "response_format": {"type": "json_object"},
    "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "hi"}, "reasoning_effort": "low", "verbosity": "low",
    "web_search_options": {}, "moderation": {"model": "omni-moderation-latest"}, "store": True,
    "service_tier": "priority", "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "explicit"},
    "echo": True, "suffix": "!", "best_of": 2,
}


def _post(running, field: str, value) -> httpx.Response:
    """A request with one more field, to the endpoint that declares it."""
    if field in ChatRequest.model_fields:
        return httpx.post(running.url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": HELLO, "max_tokens": 2, field: value})
    return httpx.post(running.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                                field: value})


def test_the_field_table_is_the_fields_the_requests_declare():
    assert set(FIELDS) == set(ChatRequest.model_fields) | set(CompletionRequest.model_fields)
    assert set(NOT_NEUTRAL) == set(NEUTRAL)


def test_every_field_of_the_openai_clients_requests_is_in_the_table_or_refused():
    from openai.types import completion_create_params as legacy
    from openai.types.chat import completion_create_params as chat

    for kind, params in ((ChatRequest, chat.CompletionCreateParamsBase), (CompletionRequest,
                                                                          legacy.CompletionCreateParamsBase)):
        declared = params.__required_keys__ | params.__optional_keys__
        assert {"model", "temperature", "stream_options"} <= declared
        base = {"model": MODEL, "messages": HELLO} if kind is ChatRequest else {"model": MODEL, "prompt": "hi"}
        for name in declared - set(FIELDS):  # a field newer than this server: refused, never ignored
            with pytest.raises(ApiError, match=f"unsupported field '{name}'"):
                parse_request(kind, json.dumps(base | {name: "x"}).encode())


@pytest.mark.parametrize("field", list(NOT_NEUTRAL))
def test_a_field_taken_only_at_its_neutral_value_is_refused_at_any_other_by_name(running, field):
    response = _post(running, field, NOT_NEUTRAL[field])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{field}: ") and error["message"] == f"{field}: {NEUTRAL[field][1]}"


@pytest.mark.parametrize("field", list(NEUTRAL))
def test_neutral_values_and_null_are_taken(running, field):
    for value in (*NEUTRAL[field][0], None):
        response = _post(running, field, value)
        assert response.status_code == 200, (value, response.text)


@pytest.mark.parametrize("value", [0, 1.0, False], ids=["zero", "one-float", "false"])
def test_a_neutral_value_of_another_kind_is_refused(running, value):
    """``0`` is not ``false``: completions' ``logprobs: 0`` or ``echo: 0`` must not pass as neutral."""
    response = _post(running, "echo", value)
    assert (response.status_code == 200) == (value is False), response.text


@pytest.mark.parametrize("field, value", [("user", "u-42"), ("safety_identifier", "hash"), ("prompt_cache_key", "k"),
                                          ("metadata", {"team": "search"})])
def test_fields_openai_uses_for_nothing_that_changes_the_answer_are_taken(running, field, value):
    assert FIELDS[field][0] == IGNORED
    response = _post(running, field, value)
    assert response.status_code == 200, response.text


def test_a_stream_with_the_neutral_stream_options_is_taken(running):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "include_obfuscation": False}}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and '"usage"' in events[-2]


def _too_large(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large" and str(limit) in error["message"]


def test_a_body_over_the_limit_is_refused_by_its_content_length_with_413(running):
    limit = running.app.state.planner.max_body
    assert limit == 1 << 20  # the tiny model's context (2048 tokens) * 32 bytes is under the 1 MiB floor
    body = b'{"model": "tiny", "prompt": "' + b"x" * limit + b'"}'
    _too_large(httpx.post(running.url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"}), limit)
    _ok(running)


def test_a_chunked_body_is_refused_with_413_once_it_passes_the_limit(running):
    limit = running.app.state.planner.max_body
    chunks = iter([b'{"model": "tiny", "prompt": "', *[b"x" * 65536] * (limit // 65536 + 1), b'"}'])
    response = httpx.post(running.url + "/v1/chat/completions", content=chunks,
                          headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers  # sent chunked: no length to check first
    _too_large(response, limit)
    _ok(running)


def test_the_openai_client_gets_413_as_an_api_error(running):
    limit = running.app.state.planner.max_body
    with pytest.raises(openai.APIStatusError) as caught:
        running.client().completions.create(model=MODEL, prompt="x" * limit, max_tokens=1)
    assert caught.value.status_code == 413


def test_the_openai_client_raises_bad_request_for_settings_it_cannot_use(running):
    with pytest.raises(openai.BadRequestError, match="applies to streamingllm, not snapkv"):
        running.client().chat.completions.create(model=MODEL, messages=HELLO,
                                                 extra_body={"uncomp": {"sinks": 4}})


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_a_400(running, body):
    response = httpx.post(running.url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    _ok(running)


def test_an_unknown_model_is_a_404(running):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        running.client().chat.completions.create(model="gpt-5", messages=HELLO)


def test_an_unknown_path_is_a_404_error_object(running):
    response = httpx.get(running.url + "/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_a_request_whose_cache_can_never_fit_is_refused(tiny_loaded):
    handle = start_server(tiny_loaded, ServeSettings(method="full", kv_cache_limit=4096, served_model_name=MODEL))
    try:
        with pytest.raises(openai.BadRequestError, match="--kv-cache-limit"):
            handle.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50)
    finally:
        handle.stop()


def test_beyond_max_queue_requests_get_429(tiny_loaded):
    handle = start_server(tiny_loaded, ServeSettings(method="full", max_batch=1, max_queue=1, served_model_name=MODEL))
    client = handle.client()

    def ask(i: int):
        try:
            return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=300, temperature=0)
        except openai.RateLimitError as exc:
            return exc

    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(ask, range(8)))
    finally:
        handle.stop()
    limited = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
    assert limited and all(o.body["code"] == "queue_full" for o in limited)
    assert all(o.choices[0].finish_reason for o in outcomes if o not in limited)


def test_an_exception_inside_a_batch_fails_that_batch_with_500_and_the_server_goes_on(running, monkeypatch):
    import uncomp_cli.serve.prefill as prefill

    real = prefill.forward_last
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill, "forward_last", broken)
    with pytest.raises(openai.InternalServerError, match="simulated failure"):
        running.client().chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    _ok(running)


def test_a_client_that_disconnects_frees_its_row(running):
    dropped = metric(running, "uncomp_cancelled_rows_total")
    generated = metric(running, "uncomp_completion_tokens_total")
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1500, "temperature": 0, "stream": True,
            "stop": ["\x00never"]}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # a first piece of text arrived: leave
    _ok(running)  # served after the abandoned row's batch ended
    assert metric(running, "uncomp_cancelled_rows_total") == dropped + 1
    assert metric(running, "uncomp_completion_tokens_total") - generated < 1500
