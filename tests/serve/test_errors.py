"""Bad input gets an OpenAI error object and never takes the server down; overload gets 429; a failing
batch fails its own requests only; a client that leaves frees its row."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serving import MODEL, metric, start_server

from uncomp_cli.serve.server import ServeSettings

HELLO = [{"role": "user", "content": "hello"}]

BAD_BODIES = {
    "missing messages": ({"model": MODEL}, "messages"),
    "empty messages": ({"model": MODEL, "messages": []}, "messages"),
    "n > 1": ({"model": MODEL, "messages": HELLO, "n": 2}, "n"),
    "unsupported field": ({"model": MODEL, "messages": HELLO, "functions": []}, "functions"),
    "tools": ({"model": MODEL, "messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
    "logprobs": ({"model": MODEL, "messages": HELLO, "logprobs": True}, "logprobs"),
    "penalty": ({"model": MODEL, "messages": HELLO, "presence_penalty": 0.5}, "presence_penalty"),
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
    import uncomp_cli.engine.steps as steps

    real = steps.forward_last
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "forward_last", broken)
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
