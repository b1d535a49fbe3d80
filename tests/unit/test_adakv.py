"""AdaKV: the layer-wide allocation by hand, then the grouped cache holding exactly the allocated
budgets, batches that behave like their rows alone, and eviction that keeps every head's share."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from kvloop import assert_each_row_as_alone, greedy, left_padded
from tiny import tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.engine.selection import select_tokens, select_tokens_per_row
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.adakv import AdaKVPolicy, adakv_budgets
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.policies.snapkv import SnapKVPolicy

INF = float("inf")


# -- the allocation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5, 1.0])
def test_the_allocation_sums_to_the_layer_total_and_respects_the_floor(floor):
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 60, generator=gen) ** 4  # skewed, so heads differ
    budget, window = 20, 6
    budgets = adakv_budgets(scores, budget, window, floor)
    assert budgets.dtype == torch.long and budgets.shape == (3, 4)
    assert budgets.sum(-1).tolist() == [4 * budget] * 3
    assert bool((budgets >= window + math.ceil(floor * (budget - window))).all())
    assert bool((budgets <= 60).all())
    if floor == 1.0:
        assert bool((budgets == budget).all()), "a floor of 1 is SnapKV's uniform budget"
    else:
        assert len(set(budgets.flatten().tolist())) > 1


def dispersed_and_concentrated(n: int = 50) -> torch.Tensor:
    """Head 0 puts its mass on 5 tokens; head 1 spreads it over all of them. [1, 2, n]."""
    scores = torch.full((1, 2, n), 0.001)
    scores[0, 0, [3, 10, 17, 24, 31]] = 1.0
    scores[0, 1] = 0.1
    return scores


@pytest.mark.parametrize("floor, extra", [(0.0, [5, 35]), (0.2, [5, 35]), (0.5, [10, 30]), (1.0, [20, 20])])
def test_the_layer_top_k_gives_more_to_the_head_whose_attention_is_spread(floor, extra):
    """Beyond the window (4) the layer has 2 × 20 tokens: the concentrated head needs only its 5
    peaks, the spread head takes the rest, until the floor reserves a share for the first."""
    budgets = adakv_budgets(dispersed_and_concentrated(), budget=24, window=4, floor=floor)
    assert budgets[0].tolist() == [4 + e for e in extra]


def test_padding_is_never_chosen_or_counted_and_short_rows_keep_everything():
    alone = dispersed_and_concentrated(50)
    padded = torch.cat([torch.full((1, 2, 8), -INF), alone], dim=-1)  # 8 pad tokens on the left
    short = torch.cat([torch.full((1, 2, 40), -INF), alone[..., :18]], dim=-1)  # 18 real tokens
    batch = torch.cat([padded, short])
    budgets = adakv_budgets(batch, budget=24, window=4, floor=0.2)
    assert budgets[0].tolist() == adakv_budgets(alone, 24, 4, 0.2)[0].tolist() == [9, 39]
    assert budgets[1].tolist() == [18, 18], "a row shorter than the budget keeps all of itself"
    assert adakv_budgets(alone, budget=80, window=4).tolist() == [[50, 50]]


@pytest.mark.parametrize("floor", [-0.1, 1.5, float("nan"), "lots"])
def test_a_floor_outside_0_1_is_refused(floor):
    with pytest.raises(UncompError, match="--floor must be a share between 0 and 1"):
        make_policy("adakv", floor=floor)


def test_per_row_selection_keeps_what_each_row_would_keep_alone():
    gen = torch.Generator().manual_seed(1)
    heads, n, window = 3, 30, 4
    scores = torch.rand(2, heads, n, generator=gen)
    scores[1, :, :7] = -INF  # row 1: 7 pad tokens
    budgets = torch.tensor([[6, 12, 9], [5, 12, 8]])
    index, kept = select_tokens_per_row(scores, budgets, window)
    assert index.shape == kept.shape == (2, heads, 12)
    for row, pad in [(0, 0), (1, 7)]:
        for head in range(heads):
            b = int(budgets[row, head])
            chosen = index[row, head][kept[row, head]]
            alone = select_tokens(scores[row:row + 1, head:head + 1, pad:], b, window)[0, 0] + pad
            assert chosen.tolist() == alone.tolist()
            assert not bool(kept[row, head, : 12 - b].any()) and bool(kept[row, head, 12 - b:].all()), \
                "fillers first, so the last stored tokens are the last seen"


# -- the cache ----------------------------------------------------------------------------------------


def record_allocations(cache) -> list[torch.Tensor]:
    """Wrap every layer's allocator to keep what it returned."""
    seen = []
    for layer in cache.layers:
        def spy(scores, allocate=layer.plan.allocator):
            seen.append(allocate(scores))
            return seen[-1]
        layer.plan = dataclasses.replace(layer.plan, allocator=spy)
    return seen


@pytest.mark.parametrize("shape", ["llama-gqa", "qwen2-gqa"])
def test_a_budget_that_holds_the_prompt_gives_the_full_cache_output(shape):
    model = tiny_model(shape)
    ids, mask = left_padded([24, 17])
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config))
    with AdaKVPolicy(budget=10_000, window=4, kernel=3).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_a_floor_of_one_is_snapkv():
    model = tiny_model("llama-mha", seed=2)
    ids, mask = left_padded([40, 31], seed=2)
    with SnapKVPolicy(budget=14, window=4, kernel=3).attach(model, mask) as cache:
        snap_logits, snap_tokens = greedy(model, ids, mask, cache)
        snap_bytes = cache.nbytes()
    with AdaKVPolicy(budget=14, floor=1.0, window=4, kernel=3).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache)
        assert cache.nbytes() == snap_bytes
    assert torch.equal(tokens, snap_tokens)
    torch.testing.assert_close(logits, snap_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["llama-gqa", "llama-mha"])
def test_stored_sizes_are_the_allocated_budgets_and_bytes_follow_the_formula(shape):
    model = tiny_model(shape, seed=3)
    layers, heads, dim = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    ids, mask = left_padded([48, 36], seed=3)
    steps, budget = 3, 16
    policy = AdaKVPolicy(budget=budget, window=4, kernel=3)
    with policy.attach(model, mask) as cache:
        allocated = record_allocations(cache)
        greedy(model, ids, mask, cache, steps=steps)
    assert len(allocated) == layers
    total = 0
    for layer, per_row in zip(cache.layers, allocated, strict=True):
        assert per_row.sum(-1).tolist() == [heads * budget] * 2
        assert sorted(h for g in layer.groups for h in g.heads) == list(range(heads))
        for group in layer.groups:
            stored = int(per_row[:, group.heads].max())
            assert group.budget == stored
            assert group.keys.shape == group.values.shape == (2, len(group.heads), stored + steps, dim)
            kept = group.valid.sum(-1) - steps  # real tokens each row holds from the prompt
            assert torch.equal(kept, per_row[:, group.heads]), "each row holds exactly its allocation"
            total += 2 * len(group.heads) * (stored + steps) * dim * 2 * 4  # B × heads × T × d × (K, V) × fp32
    assert cache_nbytes(cache) == cache.nbytes() == total
    assert any(len(set(row.tolist())) > 1 for per_row in allocated for row in per_row), "budgets differ by head"
    assert total < layers * 2 * heads * (ids.shape[1] + steps) * dim * 2 * 4
    assert policy.stats(cache) == {"kv_budget_tokens": budget}


@pytest.mark.parametrize("lengths, decode_evict", [([41, 30], False), ([41, 30], True), ([41, 12], True)],
                         ids=["append", "evict", "evict-short-row-kept-whole"])
def test_left_padded_batch_gives_each_prompt_its_own_answer(lengths, decode_evict):
    model = tiny_model("llama-mha", seed=7)
    policy = AdaKVPolicy(budget=16, window=4, kernel=3, decode_evict=decode_evict)
    ids, mask = left_padded(lengths, seed=7)
    with policy.attach(model, mask) as cache:
        batch_logits, batch_tokens = greedy(model, ids, mask, cache, steps=6)
        assert any(g.row_budgets is not None for layer in cache.layers for g in layer.groups), \
            "rows were allocated differently, so fillers were needed"
    assert_each_row_as_alone(model, policy, ids, mask, batch_logits, batch_tokens, steps=6)


def test_decode_evict_keeps_every_head_at_its_allocation():
    model = tiny_model("llama-mha", seed=6)
    ids, mask = left_padded([44, 35], seed=6)
    with AdaKVPolicy(budget=12, window=4, kernel=3, decode_evict=True).attach(model, mask) as cache:
        allocated = record_allocations(cache)
        greedy(model, ids, mask, cache, steps=0)
        sizes = [layer.group_lengths() for layer in cache.layers]
        greedy_steps = 12
        positions = mask.sum(-1, keepdim=True)
        token = torch.full((2, 1), 5)
        with torch.no_grad():
            for _ in range(greedy_steps):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
                positions = positions + 1
                assert [layer.group_lengths() for layer in cache.layers] == sizes
    for layer, per_row in zip(cache.layers, allocated, strict=True):
        for group in layer.groups:
            assert torch.equal(group.valid.sum(-1), per_row[:, group.heads])
            assert bool(group.valid[..., -4:].all()), "the newest tokens are kept"
    assert cache.get_seq_length() == 44 + greedy_steps


def test_compression_changes_the_answer_somewhere():
    """Guards the tests above against a cache that silently keeps everything."""
    model = tiny_model("llama-mha", seed=7)
    ids, mask = left_padded([40], seed=8)
    full, _ = greedy(model, ids, mask, DynamicCache(config=model.config), steps=3)
    with AdaKVPolicy(budget=6, window=4, kernel=3).attach(model, mask) as cache:
        small, _ = greedy(model, ids, mask, cache, steps=3)
    assert (small[1:] - full[1:]).abs().max() > 1e-3
