"""The engine's step API (engine/steps.py) and the plan a grouped cache is built from (engine/plan.py)."""

from __future__ import annotations

import pytest
import torch
from kvloop import greedy, left_padded
from tiny import tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.cache import GroupedKVCache, GroupedKVLayer
from uncomp_cli.engine.plan import CachePlan
from uncomp_cli.engine.selection import Budget
from uncomp_cli.engine.steps import Batch, GenerationSettings, Row, feed, prompt_positions
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.registry import make_policy

SMALL = {"window": 4, "kernel": 3}
GREEDY = GenerationSettings(max_new_tokens=8)


def run_batch(model, policy, ids, mask, settings, steps, leave=None, chunk=None):
    """Prefill then ``steps`` steps through a Batch; row ``leave[0]`` leaves after step ``leave[1]``.
    -> tokens per original row."""
    rows = [Row.sampling(settings, "cpu") for _ in range(ids.shape[0])]
    out: list[list[int]] = [[] for _ in rows]
    running = list(range(ids.shape[0]))
    with policy.attach(model, mask) as cache:
        batch = Batch(model, cache, rows)
        tokens = batch.prefill(ids, mask, prompt_positions(mask), chunk=chunk)
        for step in range(steps + 1):
            for i, original in enumerate(running):
                out[original].append(int(tokens[i]))
            if step == steps:
                break
            if leave is not None and step == leave[1]:
                gone = running.index(leave[0])
                batch.remove([gone])
                running.pop(gone)
            tokens = batch.step()
    return out


@pytest.mark.parametrize("method, options", [("full", {}), ("snapkv", {"budget": 12, **SMALL}),
                                             ("adakv", {"budget": 12, **SMALL})])
def test_rows_that_stay_after_one_leaves_decode_as_they_would_alone(method, options):
    model = tiny_model("llama-gqa", seed=1)
    ids, mask = left_padded([30, 21, 26], seed=1)
    policy = make_policy(method, **options)
    batch = run_batch(model, policy, ids, mask, GREEDY, steps=7, leave=(1, 2))
    for row, n in enumerate(mask.sum(-1).tolist()):
        alone = run_batch(model, policy, ids[row:row + 1, -n:], mask[row:row + 1, -n:], GREEDY, steps=7)[0]
        expected = alone[:3] if row == 1 else alone  # row 1 left after its 3rd token
        assert batch[row] == expected


def test_removing_rows_frees_their_cache():
    model = tiny_model("llama-gqa", seed=1)
    ids, mask = left_padded([30, 30], seed=1)
    policy = make_policy("snapkv", budget=12, **SMALL)
    with policy.attach(model, mask) as cache:
        batch = Batch(model, cache, [Row.sampling(GREEDY, "cpu") for _ in range(2)])
        batch.prefill(ids, mask, prompt_positions(mask))
        both = cache.nbytes()
        batch.remove([0])
        assert cache.nbytes() == both // 2 and len(batch) == 1
        assert batch.step().shape == (1,)


def test_a_seeded_row_samples_the_same_tokens_alone_or_in_a_batch():
    model = tiny_model("llama-gqa", seed=2)
    ids, mask = left_padded([25, 25], seed=2)
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=7)
    batch = run_batch(model, make_policy("full"), ids, mask, sampled, steps=6)
    alone = run_batch(model, make_policy("full"), ids[1:], mask[1:], sampled, steps=6)
    assert batch[1] == alone[0]
    greedy_rows = run_batch(model, make_policy("full"), ids, mask, GREEDY, steps=6)
    assert batch != greedy_rows  # the temperature did sample


@pytest.mark.parametrize("method, options", [("full", {}), ("snapkv", {"budget": "100%", **SMALL})])
def test_a_prompt_fed_in_chunks_gives_what_it_gives_in_one_piece(method, options):
    model = tiny_model("qwen2-gqa", seed=3)
    ids, mask = left_padded([40, 29], seed=3)
    policy = make_policy(method, **options)
    whole = run_batch(model, policy, ids, mask, GREEDY, steps=5)
    assert run_batch(model, policy, ids, mask, GREEDY, steps=5, chunk=16) == whole


def test_a_compressing_cache_refuses_its_prompt_in_chunks():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([40])
    policy = make_policy("snapkv", budget=12, **SMALL)
    with policy.attach(model, mask) as cache, pytest.raises(UncompError, match="in one piece"):
        feed(model, cache, ids, mask, prompt_positions(mask), chunk=16)


def test_step_before_prefill_and_a_wrong_row_count_are_refused():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([10, 10])
    batch = Batch(model, DynamicCache(config=model.config), [Row.sampling(GREEDY, "cpu")])
    with pytest.raises(UncompError, match="follows prefill"):
        batch.step()
    with pytest.raises(UncompError, match="2 prompts for a batch of 1 rows"):
        batch.prefill(ids, mask, prompt_positions(mask))


def test_the_budget_is_parsed_once_when_the_policy_is_made(monkeypatch):
    from uncomp_cli.engine.generation import generate_ids

    calls = []
    parse = Budget.parse.__func__
    monkeypatch.setattr(Budget, "parse", classmethod(lambda cls, spec: calls.append(spec) or parse(cls, spec)))
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([30, 20])
    for method in ("snapkv", "pyramidkv", "streamingllm", "adakv", "h2o"):
        calls.clear()
        policy = make_policy(method, budget="25%")
        generate_ids(model, ids, mask, GenerationSettings(max_new_tokens=3), [], policy)
        assert calls == ["25%"], method


def test_a_plan_decides_what_the_layers_do_and_a_deferred_one_keeps_the_prompt():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([30])
    policy = make_policy("snapkv", budget=12, **SMALL)
    plan = policy.plan(model, mask)
    assert plan.budget_table() == [[12, 12]] * model.config.num_hidden_layers
    assert plan.stats == {"kv_budget_tokens": 12}
    deferred = plan.deferred()
    assert all(layer.defer_selection for layer in deferred.layers) and deferred.budget_table() == plan.budget_table()
    with policy.attach(model, mask, deferred) as cache:
        greedy(model, ids, mask, cache, steps=0)
    assert all(layer.holds_whole_context() and layer.group_lengths() == [30] for layer in cache.layers)
    for layer in cache.layers:
        layer.select(torch.rand(1, 2, 30), window=4)
    assert all(layer.group_lengths() == [12] for layer in cache.layers)


def test_a_layer_exported_and_restored_holds_the_same_tokens():
    model = tiny_model("llama-gqa", seed=4)
    ids, mask = left_padded([30, 22], seed=4)
    policy = make_policy("adakv", budget=10, decode_evict=True, **SMALL)
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=2)
    restored = []
    for layer in cache.layers:
        spec, tensors = layer.export()
        again = GroupedKVLayer.restore(layer.plan, spec, {name: t.clone() for name, t in tensors.items()})
        assert again.export()[0] == spec
        for name, tensor in again.export()[1].items():
            assert torch.equal(tensor, tensors[name]), name
        restored.append(again)
    copy = GroupedKVCache(CachePlan(tuple(layer.plan for layer in restored)), restored)
    assert copy.nbytes() == cache.nbytes() and copy.get_seq_length() == cache.get_seq_length()
