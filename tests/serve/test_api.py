"""The server through the real openai client: endpoints, streaming, per-request settings, batching."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serving import MODEL, metric

from uncomp_cli.engine.generation import GenerationSettings, generate
from uncomp_cli.policies.registry import make_policy

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
