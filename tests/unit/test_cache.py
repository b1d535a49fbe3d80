"""The grouped KV cache: same answers as transformers' DynamicCache when nothing is dropped, real
per-group storage when something is, and left-padded batches that behave like their rows alone."""

from __future__ import annotations

import pytest
import torch
from kvloop import assert_each_row_as_alone, greedy, left_padded
from tiny import TINY_SHAPES, tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.attention import grouped_attention, use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache, GroupedKVLayer, cache_nbytes
from uncomp_cli.engine.plan import CachePlan, LayerPlan
from uncomp_cli.engine.selection import SnapKVScorer
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.snapkv import SnapKVPolicy
from uncomp_cli.policies.uncomp import UNCompPolicy

SHAPES = sorted(TINY_SHAPES)
SMALL = SnapKVScorer(window=4, kernel=3)


def kv_heads(model) -> int:
    return model.config.num_key_value_heads


def uniform(model, budget) -> torch.Tensor:
    return torch.full((model.config.num_hidden_layers, kv_heads(model)), budget)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lengths", [[24], [24, 17]], ids=["single", "left-padded"])
def test_nothing_dropped_matches_dynamic_cache_in_a_manual_loop(shape, lengths):
    model = tiny_model(shape)
    before = model.config._attn_implementation
    ids, mask = left_padded(lengths)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config))
    with SnapKVPolicy(budget=10_000).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert model.config._attn_implementation == before  # the model's own attention is back


@pytest.mark.parametrize("shape", SHAPES)
def test_nothing_dropped_matches_stock_generate(shape):
    model = tiny_model(shape)
    ids, mask = left_padded([20, 13], seed=1)
    settings = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, **settings)
        with SnapKVPolicy(budget=10_000).attach(model, mask) as cache:
            ours = model.generate(ids, cache=cache, **settings)
    assert torch.equal(ours, reference)
    assert cache.get_seq_length() == ids.shape[1] + 7


def test_groups_of_different_budgets_match_dynamic_cache_when_nothing_is_dropped():
    model = tiny_model("llama-mha")  # 4 KV heads; groups {0, 2} and {1, 3} are not contiguous
    ids, mask = left_padded([22, 15], seed=2)
    budgets = torch.tensor([[40, 60, 40, 60]] * model.config.num_hidden_layers)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config))
    with UNCompPolicy(budgets).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache)
        assert [g.heads for g in cache.layers[0].groups] == [[0, 2], [1, 3]]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("shape", ["llama-gqa", "llama-mha"])
def test_bytes_held_follow_the_formula_and_shapes_follow_the_budgets(shape):
    model = tiny_model(shape)
    layers, heads, dim = model.config.num_hidden_layers, kv_heads(model), model.config.head_dim
    ids, mask = left_padded([30, 26], seed=3)
    gen = torch.Generator().manual_seed(0)
    budgets = torch.randint(6, 40, (layers, heads), generator=gen)
    steps = 3
    with UNCompPolicy(budgets, window=4, kernel=3).attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=steps)
    expected_total = 0
    for layer, row in zip(cache.layers, budgets.tolist(), strict=True):
        assert sum(len(g.heads) for g in layer.groups) == heads  # stored per KV head, never per query head
        expected = 0
        for group in layer.groups:
            kept = min(group.budget, ids.shape[1]) + steps
            assert group.keys.shape == (2, len(group.heads), kept, dim)
            assert group.values.shape == group.keys.shape and group.valid.shape == (2, len(group.heads), kept)
            assert all(row[h] == group.budget for h in group.heads)
            expected += 2 * len(group.heads) * kept * dim * 2 * 4  # B × heads × tokens × d × (K, V) × fp32
        assert layer.nbytes() == expected
        expected_total += expected
    assert cache_nbytes(cache) == cache.nbytes() == expected_total
    full = layers * 2 * heads * (ids.shape[1] + steps) * dim * 2 * 4
    assert expected_total < full


def test_decode_attends_each_group_over_its_own_tokens():
    """Two KV heads with different budgets (different lengths): check one decode step by hand."""
    torch.manual_seed(0)
    layer = GroupedKVLayer(LayerPlan((5, 8), SMALL))
    cache = GroupedKVCache(CachePlan((layer.plan,)), [layer])
    module = torch.nn.Module()
    module.layer_idx, module._uncomp_cache = 0, cache
    q, k, v = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    cache.update(k, v, 0)
    grouped_attention(module, q, k, v, None, scaling=0.5)
    assert layer.group_lengths() == [5, 8]
    stored = [(g.keys.clone(), g.values.clone()) for g in layer.groups]
    q1, k1, v1 = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    cache.update(k1, v1, 0)
    out, _ = grouped_attention(module, q1, k1, v1, torch.ones(1, 13, dtype=torch.long), scaling=0.5)
    for head in range(4):
        keys, values = stored[head // 2]  # query heads 0, 1 read KV head 0 (group 0), 2, 3 KV head 1
        keys = torch.cat([keys[0, 0], k1[0, head // 2]])
        values = torch.cat([values[0, 0], v1[0, head // 2]])
        want = torch.softmax(q1[0, head] @ keys.T * 0.5, dim=-1) @ values
        torch.testing.assert_close(out[0, 0, head], want[0], atol=1e-6, rtol=1e-5)
    assert layer.get_seq_length() == 13 and layer.group_lengths() == [6, 9]
    assert layer.get_mask_sizes(1) == (10, 4)


def test_compressed_decode_matches_a_dynamic_cache_holding_the_same_tokens():
    """Batch 1, one budget: every KV head keeps the same number of tokens, so a DynamicCache can hold
    exactly what the grouped cache kept and stock SDPA must then give the same next logits."""
    model = tiny_model("llama-gqa", seed=4)
    ids, mask = left_padded([40], seed=4)
    positions = torch.arange(40)[None]
    with torch.no_grad(), SnapKVPolicy(budget=12, window=4, kernel=3).attach(model, mask) as cache:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        copy = DynamicCache(config=model.config)
        for index, layer in enumerate(cache.layers):
            (group,) = layer.groups
            copy.update(group.keys.clone(), group.values.clone(), index)
        step = dict(input_ids=token, position_ids=torch.tensor([[40]]), use_cache=True)
        ours = model(cache=cache, attention_mask=torch.ones(1, 41, dtype=torch.long), **step).logits
    with torch.no_grad():
        reference = model(cache=copy, **step).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


class SpyScorer(SnapKVScorer):
    """Records the scores each layer computed at prefill."""

    def score(self, window_probs, key_valid, num_kv_heads):
        scores = super().score(window_probs, key_valid, num_kv_heads)
        self.seen.append(scores.clone())
        return scores


def positions_of(stored: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Original positions of stored key vectors [T, d], found in the full keys [N, d]."""
    distance = (stored[:, None, :] - full[None, :, :]).norm(dim=-1)  # [T, N]
    nearest = distance.min(-1)
    assert bool((nearest.values < 1e-4).all())
    return nearest.indices.tolist()


@pytest.mark.parametrize("shape", ["llama-gqa", "qwen2-gqa"])
def test_top_scored_tokens_and_the_window_survive_and_padding_is_never_selected(shape):
    model = tiny_model(shape, seed=5)
    ids, mask = left_padded([48, 30], seed=5)
    pad = 18
    spy = SpyScorer(window=6, kernel=3)
    object.__setattr__(spy, "seen", [])
    budget = 16
    full = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=full, use_cache=True)
        policy = UNCompPolicy(uniform(model, budget), window=6, kernel=3)
        policy.scorer = spy
        with policy.attach(model, mask) as cache:
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    assert len(spy.seen) == model.config.num_hidden_layers
    for index, layer in enumerate(cache.layers):
        (group,) = layer.groups
        scores = spy.seen[index]
        for row in range(2):
            for head in range(kv_heads(model)):
                kept = positions_of(group.keys[row, head], full.layers[index].keys[row, head])
                assert kept == sorted(kept)
                assert kept[-6:] == list(range(42, 48)), "the last window always survives"
                candidates = scores[row, head, :42]
                chosen = torch.zeros(42, dtype=torch.bool)
                chosen[kept[:-6]] = True
                assert len(kept) == budget
                assert candidates[chosen].min() >= candidates[~chosen].max(), "the top-scored tokens survive"
                assert int(candidates.argmax()) in kept
                if row == 1:
                    assert min(kept) >= pad, "padding is never selected"
                    assert bool(group.valid[row, head].all())


def test_decode_evict_keeps_every_group_at_its_budget():
    model = tiny_model("llama-mha", seed=6)
    ids, mask = left_padded([36, 29], seed=6)
    budgets = torch.tensor([[12, 20, 12, 50]] * model.config.num_hidden_layers)
    sizes, seen = [], []
    policy = UNCompPolicy(budgets, window=4, kernel=3, decode_evict=True)
    with torch.no_grad(), policy.attach(model, mask) as cache:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        next_pos = mask.sum(-1, keepdim=True)
        for _ in range(20):
            sizes.append([layer.group_lengths() for layer in cache.layers])
            seen.append(cache.get_seq_length())
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, position_ids=next_pos,
                        cache=cache, use_cache=True)
            next_pos = next_pos + 1
    # groups at their budget stay there; the 50-token group grows until it is full
    assert sizes == [[[12, 20, min(36 + step, 50)]] * 4 for step in range(20)]
    assert seen == list(range(36, 56))
    assert cache.layers[0].get_max_length() == 50


@pytest.mark.parametrize("policy", [
    SnapKVPolicy(budget=14, window=4, kernel=3),
    SnapKVPolicy(budget=14, window=4, kernel=5, pooling="avg", aggregate="max"),
    SnapKVPolicy(budget=14, window=4, kernel=3, decode_evict=True),
], ids=["append", "avg-pool", "evict"])
def test_left_padded_batch_gives_each_prompt_its_own_answer(policy):
    model = tiny_model("llama-gqa", seed=7)
    lengths = [33, 21]
    ids, mask = left_padded(lengths, seed=7)
    with policy.attach(model, mask) as cache:
        batch_logits, batch_tokens = greedy(model, ids, mask, cache, steps=8)
    assert_each_row_as_alone(model, policy, ids, mask, batch_logits, batch_tokens, steps=8)


def test_compression_changes_the_answer_somewhere():
    """Guards the tests above against a cache that silently keeps everything."""
    model = tiny_model("llama-gqa", seed=7)
    ids, mask = left_padded([40], seed=8)
    full, _ = greedy(model, ids, mask, DynamicCache(config=model.config), steps=3)
    with SnapKVPolicy(budget=5, window=4, kernel=3).attach(model, mask) as cache:
        small, _ = greedy(model, ids, mask, cache, steps=3)
    torch.testing.assert_close(small[0], full[0])  # prefill logits use the full prompt
    assert (small[1:] - full[1:]).abs().max() > 1e-3


def test_get_seq_length_counts_tokens_seen_not_stored():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([30])
    with SnapKVPolicy(budget=8, window=4, kernel=3).attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=4)
    assert cache.get_seq_length() == 34
    assert cache.layers[0].group_lengths() == [12]
    assert cache.get_mask_sizes(1, 0) == (13, 22)


def test_the_grouped_cache_refuses_to_run_under_another_attention():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([10])
    cache = GroupedKVCache(CachePlan.uniform(uniform(model, 8)))
    with pytest.raises(UncompError, match="'uncomp'"):
        greedy(model, ids, mask, cache, steps=1)  # stock sdpa would silently ignore the past


def test_the_grouped_attention_refuses_to_run_without_its_cache():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([10])
    with use_grouped_cache(model, GroupedKVCache(CachePlan.uniform(uniform(model, 8)))):
        with pytest.raises(UncompError, match="without its grouped KV cache"):
            greedy(model, ids, mask, DynamicCache(config=model.config), steps=0)
    model.set_attn_implementation("uncomp")
    try:
        with pytest.raises(UncompError, match="attach"):
            greedy(model, ids, mask, DynamicCache(config=model.config), steps=0)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("lengths", [[30], [30, 19]], ids=["single", "left-padded"])
def test_a_sliding_window_layer_keeps_its_window_and_matches_the_dynamic_cache(lengths):
    model = tiny_model("mistral-gqa")
    model.config.sliding_window = 8  # every layer slides: a query sees its last 8 positions
    ids, mask = left_padded(lengths)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=6)
    with SnapKVPolicy(budget=10_000).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=6)
        stored = [group.length() for layer in cache.layers for group in layer.groups]
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert max(stored) <= 8  # never more than the window (7 kept + the newest)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_left_padded_causal_attention_runs_row_by_row_as_the_masked_form_does(kv_heads):
    from uncomp_cli.engine.attend import _masked_causal_attention, causal_attention

    torch.manual_seed(0)
    query = torch.randn(3, 4, 9, 8)
    keys, values = torch.randn(3, kv_heads, 9, 8), torch.randn(3, kv_heads, 9, 8)
    valid = torch.arange(9)[None] >= torch.tensor([[0], [3], [8]])  # rows of 9, 6 and 1 real tokens
    fast = causal_attention(query, keys, values, valid, 0.35)
    torch.testing.assert_close(fast, _masked_causal_attention(query, keys, values, valid, 0.35))
    alone = causal_attention(query[1:2, :, 3:], keys[1:2, :, 3:], values[1:2, :, 3:], None, 0.35)
    torch.testing.assert_close(fast[1:2, :, 3:], alone)
    holes = valid.clone()
    holes[0, 4] = False  # not left padding: the masked form
    torch.testing.assert_close(causal_attention(query, keys, values, holes, 0.35),
                               _masked_causal_attention(query, keys, values, holes, 0.35))
