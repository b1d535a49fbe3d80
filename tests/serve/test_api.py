"""The server through the real openai client: endpoints, streaming, per-request settings, batching."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from serving import MODEL, metric, start_server

from uncomp_cli.engine.generation import GenerationSettings, generate
from uncomp_cli.models.loading import load_model
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.serve.server import ServeSettings, sampling_defaults

SNAPKV = {"budget": "50%", "window": 4, "kernel": 3}
PROMPTS = [f"The quick brown fox {i} " + "hello world " * (i % 5) + "the capital of France is" for i in range(16)]


def chat(client, content: str, max_tokens: int = 8, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0, **kwargs)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_health(running):
    response = httpx.get(running.url + "/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_chat_answers_as_the_library_does_and_says_how(client, tiny_loaded):
    response = chat(client, "The capital of France is", max_tokens=12)
    served = response.model_extra["uncomp"]
    # the server keeps the share of each prompt as a token count (rounded up to 8), alone or batched
    assert served["budget"] == "50%" and served["kv_budget_tokens"] % 8 == 0
    own = SNAPKV | {"budget": str(served["kv_budget_tokens"])}
    expected = generate(tiny_loaded, "The capital of France is", GenerationSettings(max_new_tokens=12),
                        make_policy("snapkv", **own))
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.new_tokens
    assert response.choices[0].finish_reason == ("length" if expected.new_tokens == 12 else "stop")
    assert served["method"] == "snapkv" and served["kv_budget_tokens"] < expected.prompt_tokens
    assert served["kv_cache_bytes"] < expected.full_kv_cache_bytes


def test_completions_endpoint(client, tiny_loaded):
    response = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6, temperature=0)
    expected = generate(tiny_loaded, "hello world", GenerationSettings(max_new_tokens=6), None, raw=True)
    assert response.object == "text_completion"
    assert response.choices[0].text == expected.text
    assert response.usage.total_tokens == expected.prompt_tokens + expected.new_tokens


def test_streaming_sends_the_same_text_in_openai_chunks_then_done(running, client):
    whole = chat(client, "hello world", max_tokens=10)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", running.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finishing] == [whole.choices[0].finish_reason]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.usage.model_dump(exclude_none=True)


def test_the_openai_client_streams(client):
    pieces = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=6, temperature=0, stream=True))
    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert text == chat(client, "hello", max_tokens=6).choices[0].message.content


def test_extra_body_picks_the_method_and_budget_per_request(client):
    full = chat(client, PROMPTS[3], extra_body={"uncomp": {"method": "full"}})
    small = chat(client, PROMPTS[3], extra_body={"uncomp": {"budget": "25%"}})
    assert full.model_extra["uncomp"]["method"] == "full"
    served = small.model_extra["uncomp"]
    assert (served["method"], served["budget"], served["window"]) == ("snapkv", "25%", 4)  # the server's window stays
    assert small.model_extra["uncomp"]["kv_cache_bytes"] < full.model_extra["uncomp"]["kv_cache_bytes"]


def test_stop_sequences_cut_the_text(client):
    whole = chat(client, "hello world", max_tokens=16).choices[0].message.content
    stop = whole[3:5]
    assert stop, "the tiny model's answer is long enough to cut"
    cut = chat(client, "hello world", max_tokens=16, stop=[stop]).choices[0]
    assert cut.message.content == whole[:whole.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("uncomp", [{"method": "full"}, None, {"method": "uncomp", "budget": "50%", "window": 4,
                                                                 "kernel": 3}],
                         ids=["full", "snapkv", "uncomp"])
def test_sixteen_concurrent_greedy_requests_equal_the_same_requests_one_at_a_time(client, uncomp):
    extra = {"extra_body": {"uncomp": uncomp}} if uncomp else {}

    def ask(i: int):
        return chat(client, PROMPTS[i], max_tokens=3 + i, **extra)  # rows leave the batch at different steps

    alone = [ask(i) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert [r.usage.completion_tokens for r in together] == [r.usage.completion_tokens for r in alone]
    assert max(r.model_extra["uncomp"]["batch_size"] for r in together) > 1  # they were batched


def test_a_new_turn_about_the_same_document_reuses_its_compressed_context(client):
    document = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    first = [{"role": "user", "content": document + "\n\nWhat does the fox do?"}]
    one = client.chat.completions.create(model=MODEL, messages=first, max_tokens=5, temperature=0)
    assert one.model_extra["uncomp"]["context_reused"] is False
    assert one.model_extra["uncomp"]["context_tokens"] >= 64
    second = [*first, {"role": "assistant", "content": one.choices[0].message.content},
              {"role": "user", "content": "And the dog?"}]
    two = client.chat.completions.create(model=MODEL, messages=second, max_tokens=5, temperature=0)
    again = client.chat.completions.create(model=MODEL, messages=second, max_tokens=5, temperature=0)
    assert two.model_extra["uncomp"]["context_reused"] is True
    assert two.model_extra["uncomp"]["context_tokens"] == one.model_extra["uncomp"]["context_tokens"]
    assert again.choices[0].message.content == two.choices[0].message.content  # the context came back intact
    other = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": document.replace("fox", "cat") + "\n\nWhat?"}],
        max_tokens=5, temperature=0)
    assert other.model_extra["uncomp"]["context_reused"] is False


def test_a_reused_full_cache_context_answers_as_a_whole_prefill_of_the_same_tokens(client, tiny_loaded):
    from uncomp_cli.engine.generation import generate_ids
    from uncomp_cli.serve.prompts import chat_prompt

    document = " ".join(["hello world, the quick brown fox"] * 10)
    messages = [{"role": "user", "content": document + "\n\nThe capital of France is"}]
    extra = {"uncomp": {"method": "full"}}
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                           extra_body=extra)
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            extra_body=extra)
    assert second.model_extra["uncomp"]["context_reused"] is True
    import torch

    ids = chat_prompt(tiny_loaded.tokenizer, messages, reuse_min_tokens=64).ids
    out = generate_ids(tiny_loaded.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                       GenerationSettings(max_new_tokens=8), [2])
    expected = tiny_loaded.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
    assert first.choices[0].message.content == second.choices[0].message.content == expected


def test_metrics_count_requests_and_tokens(running, client):
    before = metric(running, "uncomp_completion_tokens_total")
    response = chat(client, "hello", max_tokens=4)
    assert metric(running, "uncomp_completion_tokens_total") == before + response.usage.completion_tokens
    text = httpx.get(running.url + "/metrics").text
    for name in ("uncomp_queue_depth", "uncomp_kv_cache_bytes", "uncomp_time_to_first_token_seconds_bucket",
                 'uncomp_requests_total{endpoint="chat",outcome="ok"}'):
        assert name in text


# -- defaults a request leaves to the server -------------------------------------------------------


def _with_generation_config(**values):
    from transformers import GenerationConfig

    return SimpleNamespace(model=SimpleNamespace(generation_config=GenerationConfig(**values)))


@pytest.mark.parametrize("values, expected", [
    ({}, (0.0, 1.0)),  # says nothing of sampling: greedy, as transformers' generate and uncomp generate
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, (0.6, 0.9)),
    ({"do_sample": True}, (1.0, 1.0)),
    ({"temperature": 0.7}, (0.7, 1.0)),  # a temperature without do_sample: meant for sampling, as vLLM reads it
    ({"do_sample": False, "temperature": 0.6}, (0.0, 1.0)),  # do_sample false: greedy whatever else it says
], ids=["nothing", "sampling", "do_sample-only", "temperature-only", "greedy"])
def test_sampling_defaults_come_from_the_generation_config(values, expected):
    defaults = sampling_defaults(_with_generation_config(**values))
    assert (defaults.temperature, defaults.top_p) == expected and defaults.source


def test_sampling_defaults_of_tiny_models_with_and_without_a_generation_config(tiny_loaded, tiny_model_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    from uncomp_cli.models.loading import load_model

    assert sampling_defaults(tiny_loaded)[:2] == (0.0, 1.0)  # a saved config with no sampling values
    assert sampling_defaults(SimpleNamespace(model=SimpleNamespace()))[:2] == (0.0, 1.0)  # none at all
    folder = tmp_path / "sampled"
    shutil.copytree(tiny_model_dir, folder)
    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    assert sampling_defaults(load_model(str(folder), device="cpu"))[:2] == (0.6, 0.9)


def test_a_request_without_temperature_gets_the_models_default_and_says_so(client):
    default = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello world"}],
                                             max_tokens=8)
    greedy = chat(client, "hello world", max_tokens=8)
    assert default.choices[0].message.content == greedy.choices[0].message.content
    assert (default.model_extra["uncomp"]["temperature"], default.model_extra["uncomp"]["top_p"]) == (0.0, 1.0)
    sampled = chat(client, "hello world", max_tokens=8, extra_body={"temperature": 0.9})  # asked: as asked
    assert sampled.model_extra["uncomp"]["temperature"] == 0.9


# -- message names ----------------------------------------------------------------------------------


def test_a_name_is_taken_only_by_a_template_that_writes_it():
    from tiny import tiny_tokenizer

    from uncomp_cli.serve.prompts import template_carries_name
    from uncomp_cli.serve.protocol import ChatRequest

    tokenizer = tiny_tokenizer()
    assert not template_carries_name(tokenizer)  # the tiny template, like most, drops it
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m.name %}{{ m.name }}: {% endif %}"
                               "{{ m['content'] }}</s>{% endfor %}")
    assert template_carries_name(tokenizer)
    request = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "ann"}]})
    assert request.chat(names=True) == [{"role": "user", "content": "hi", "name": "ann"}]
    assert "ann: hi" in tokenizer.apply_chat_template(request.chat(names=True), tokenize=False)


def test_a_name_the_template_drops_is_refused_not_ignored(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="does not carry a message's name") as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi", "name": "ann"}],
                                       max_tokens=2)
    assert caught.value.body["param"] == "messages" and "messages.0.name" in caught.value.body["message"]


# -- log probabilities ------------------------------------------------------------------------------

def test_chat_logprobs_come_with_every_token_in_openais_shape(client):
    response = chat(client, "hello world", max_tokens=6, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens or response.choices[0].finish_reason == "stop"
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == response.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].logprob >= token.logprob  # greedy: the chosen token is the most likely
        assert token.top_logprobs[0].token == token.token
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello world"}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    tokens = [t.token for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for t in chunk.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_completion_logprobs_are_the_legacy_lists(client):
    response = client.completions.create(model=MODEL, prompt="hello world", max_tokens=5, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert all(len(top) in (2, 3) for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": []}


def test_the_handlers_put_the_workers_logprobs_on_the_chunk_that_carries_their_text():
    """The app's side of the worker's ("logprobs", entries) events, without a worker."""
    from uncomp_cli.serve.app import _stream, _whole
    from uncomp_cli.serve.metrics import ServerMetrics

    job = SimpleNamespace(prompt=SimpleNamespace(ids=[1, 2]), cancelled=threading.Event())
    events = [("logprobs", [_entry("He", -0.5)]), ("logprobs", [_entry("llo", -0.25)]), ("text", "Hello"),
              ("logprobs", [_entry("!", -1.0)]), ("done", "stop", 3, {})]

    async def run(chat: bool):
        queue: asyncio.Queue = asyncio.Queue()
        for event in events:
            queue.put_nowait(event)
        chunks = [line async for line in _stream(job, queue, chat, "id", MODEL, False, ServerMetrics(), "chat",
                                                 lambda job: None)]
        for event in events:
            queue.put_nowait(event)
        whole = await _whole(None, job, queue, chat, "id", MODEL, ServerMetrics(), "chat")
        return [json.loads(c.removeprefix("data: ")) for c in chunks[:-1]], json.loads(whole.body)

    chunks, whole = asyncio.run(run(chat=True))
    carried = [[t["token"] for t in c["choices"][0]["logprobs"]["content"]] for c in chunks
               if c["choices"][0]["logprobs"]]
    assert carried == [["He", "llo"], ["!"]]  # the text chunk, then the finishing one
    assert [t["token"] for t in whole["choices"][0]["logprobs"]["content"]] == ["He", "llo", "!"]
    chunks, whole = asyncio.run(run(chat=False))
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks if c["choices"][0]["logprobs"]]
    assert offsets == [[0, 2], [5]]  # a stream's offsets go on from chunk to chunk
    assert whole["choices"][0]["logprobs"]["tokens"] == ["He", "llo", "!"]
    assert whole["choices"][0]["logprobs"]["text_offset"] == [0, 2, 5]


def test_ignore_eos_keeps_answering_past_the_end_of_sequence_token(tiny_model_dir):
    # a model whose end-of-sequence token is the first one it answers "hello" with: without
    # ignore_eos the answer is empty, with it the answer runs to max_tokens
    loaded = load_model(str(tiny_model_dir), device="cpu")
    first = generate(loaded, "hello", GenerationSettings(max_new_tokens=1), None, raw=True).token_ids[0]
    loaded.model.generation_config.eos_token_id = first
    handle = start_server(loaded, ServeSettings(method="full", served_model_name=MODEL))
    try:
        client = handle.client()
        stopped = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0).choices[0]
        assert stopped.finish_reason == "stop" and stopped.text == ""
        kept = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert kept.choices[0].finish_reason == "length" and kept.usage.completion_tokens == 5
    finally:
        handle.stop()
