"""Rows with caches of their own decoding together (engine/ragged.py), prompts fed in chunks into a
deferred plan (GroupedKVLayer.select_by_window), and the server's per-request prefill
(serve/prefill.py) with its document prefix store."""

from __future__ import annotations

import pytest
import torch
from kvloop import left_padded
from tiny import tiny_model

from uncomp_cli.engine.attention import use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.generation import GenerationSettings, generate_ids
from uncomp_cli.engine.plan import CachePlan
from uncomp_cli.engine.ragged import RaggedBatch
from uncomp_cli.engine.steps import Row, pick_tokens
from uncomp_cli.engine.steps import feed as feed_ids
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.serve.prefill import PrefixStore, start_feed

SMALL = {"window": 4, "kernel": 3}
METHODS = [("full", {}), ("snapkv", {"budget": 12, **SMALL}), ("adakv", {"budget": 10, **SMALL}),
           ("pyramidkv", {"budget": 14, **SMALL}), ("streamingllm", {"budget": 12}),
           ("snapkv", {"budget": 9, "decode_evict": True, **SMALL})]
GREEDY = GenerationSettings(max_new_tokens=6)


def prompt(length: int, seed: int) -> list[int]:
    ids, _ = left_padded([length], seed=seed)
    return ids[0].tolist()


def alone(model, policy, ids: list[int], steps: int = 6) -> list[int]:
    """What generate_ids gives for ``ids`` alone under ``policy`` (None: the full DynamicCache)."""
    input_ids = torch.tensor([ids])
    out = generate_ids(model, input_ids, torch.ones_like(input_ids), GenerationSettings(max_new_tokens=steps), [],
                       None if policy.name == "full" else policy)
    return out.tokens[0]


def prefill(model, policy, ids, chunk, store=None, context=None):
    """Feed a request's prompt through serve.prefill; -> (feed, first token)."""
    feed = start_feed(model, policy, ids, chunk, context, store)
    while (logits := feed.advance()) is None:
        pass
    return feed, int(pick_tokens(logits, GREEDY, None)[0])


@pytest.mark.parametrize("method, options", METHODS)
@pytest.mark.parametrize("chunk", [16, 1000])
def test_a_prompt_fed_in_chunks_keeps_and_answers_as_one_piece(method, options, chunk):
    model = tiny_model("llama-gqa", seed=1)
    ids = prompt(45, seed=1)
    policy = make_policy(method, **options)
    feed, first = prefill(model, policy, ids, chunk)
    assert feed.chunked == (chunk < len(ids))
    batch = RaggedBatch(model)
    batch.join(Row(GREEDY), feed.cache, feed.total, first)
    tokens = [first] + [int(batch.step()[0]) for _ in range(5)]
    assert tokens == alone(model, policy, ids)


def test_rows_of_different_methods_join_and_leave_and_each_decodes_as_alone():
    model = tiny_model("qwen2-gqa", seed=2)
    requests = [(make_policy(m, **o), prompt(20 + 7 * i, seed=i)) for i, (m, o) in enumerate(METHODS)]
    expected = [alone(model, policy, ids, steps=8) for policy, ids in requests]
    batch, running, got = RaggedBatch(model), [], {i: [] for i in range(len(requests))}
    for step in range(14):
        if step < len(requests):  # a new row joins every step
            policy, ids = requests[step]
            feed, first = prefill(model, policy, ids, chunk=8)
            batch.join(Row(GREEDY), feed.cache, feed.total, first)
            running.append(step)
            got[step].append(first)
        if not running:
            break
        for index, token in zip(list(running), batch.step().tolist()):
            got[index].append(token)
        leaving = [i for i, index in enumerate(running) if len(got[index]) == len(expected[index])]
        batch.remove(leaving)
        running = [index for i, index in enumerate(running) if i not in leaving]
    assert [got[i] for i in range(len(requests))] == expected


def test_a_seeded_row_samples_alone_as_among_others():
    model = tiny_model("llama-gqa", seed=3)
    sampled = GenerationSettings(max_new_tokens=6, temperature=1.3, seed=5)

    def run(others: int) -> list[int]:
        batch = RaggedBatch(model)
        for i in range(others + 1):
            feed, _ = prefill(model, make_policy("snapkv", budget=12, **SMALL), prompt(30, seed=i), chunk=8)
            batch.join(Row.sampling(sampled, "cpu"), feed.cache, feed.total, 7)
        return [batch.step().tolist()[-1] for _ in range(5)]

    assert run(0) == run(2)


def test_h2o_and_pruned_plans_prefill_in_one_piece_or_unpruned():
    model = tiny_model("llama-gqa")
    ids = prompt(40, seed=4)
    feed = start_feed(model, make_policy("h2o", budget=12, window=4), ids, chunk=8)
    assert not feed.chunked  # it scores with every prompt query
    h2o = make_policy("h2o", budget=12, window=4)
    mask = torch.ones(1, 40, dtype=torch.long)
    cache = GroupedKVCache(h2o.plan(model, mask).deferred())
    with use_grouped_cache(model, cache):
        feed_ids(model, cache, torch.tensor([ids]), mask, torch.arange(40)[None], chunk=8)
    with pytest.raises(UncompError, match="every prompt query"):
        cache.select_by_window()
    uncomp = make_policy("uncomp", kv_head_budgets=torch.full((4, 2), 12), layer_keep=[1.0, 1.0, 0.6, 0.4], **SMALL)
    chunked = start_feed(model, uncomp, ids, chunk=8)
    assert chunked.chunked and chunked.cache.plan.prune is None and chunked.stats == {"prefill_pruned": False}
    whole = start_feed(model, uncomp, ids, chunk=100)
    assert not whole.chunked and whole.cache.plan.prune is not None


def test_a_document_prefix_is_kept_whole_and_a_later_question_skips_its_prefill():
    model = tiny_model("llama-gqa", seed=6)
    document, first_q, second_q = prompt(60, seed=6), prompt(9, seed=7), prompt(11, seed=8)
    store = PrefixStore(1 << 30)
    policy = make_policy("snapkv", budget="25%", **SMALL)
    feed, first = prefill(model, policy, document + first_q, chunk=16, store=store, context=document)
    assert feed.stats == {"context_tokens": 60, "context_reused": False} and len(store) == 1
    again, again_first = prefill(model, policy, document + second_q, chunk=16, store=store, context=document)
    assert again.stats["context_reused"] is True
    fresh, fresh_first = prefill(model, policy, document + second_q, chunk=16)  # no store: the whole prompt
    assert again_first == fresh_first
    for reused, new in zip(again.cache.layers, fresh.cache.layers):
        assert [g.positions.tolist() for g in reused.groups] == [g.positions.tolist() for g in new.groups]
    assert store.bytes == sum(layer.nbytes() for layer in store.get(next(iter(store._entries))).layers)


def test_the_full_cache_as_a_grouped_one_answers_as_dynamic_cache():
    model = tiny_model("mistral-gqa", seed=9)
    ids = prompt(33, seed=9)
    cache = GroupedKVCache(CachePlan.keep_all(model.config.num_hidden_layers, model.config.num_key_value_heads))
    feed, first = prefill(model, make_policy("full"), ids, chunk=10)
    assert feed.cache.keeps(10_000) and isinstance(cache, GroupedKVCache)
    batch = RaggedBatch(model)
    batch.join(Row(GREEDY), feed.cache, feed.total, first)
    assert [first] + [int(batch.step()[0]) for _ in range(5)] == alone(model, make_policy("full"), ids)
