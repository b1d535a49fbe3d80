"""Baseline methods (StreamingLLM, PyramidKV, H2O) and the UNComp ablations: what each keeps, in
real bytes, and that it changes nothing when the budget holds the whole prompt."""

from __future__ import annotations

import pytest
import torch
from kvloop import greedy, left_padded
from test_profile import make_profile
from tiny import tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.selection import aggregate_heads, select_tokens
from uncomp_cli.errors import UncompError
from uncomp_cli.policies import available_methods, make_policy
from uncomp_cli.policies.h2o import H2OPolicy, H2OScorer, accumulated_attention
from uncomp_cli.policies.pyramidkv import PyramidKVPolicy, pyramid_budgets
from uncomp_cli.policies.snapkv import SnapKVPolicy
from uncomp_cli.policies.streamingllm import StreamingLLMPolicy, sink_and_recent_scores
from uncomp_cli.policies.uncomp_ablations import UNCompNoPrunePolicy, UNCompUniformPolicy

BASELINES = {
    "streamingllm": lambda budget, evict: StreamingLLMPolicy(budget=budget, sinks=4, decode_evict=evict),
    "pyramidkv": lambda budget, evict: PyramidKVPolicy(budget=budget, window=4, kernel=3, decode_evict=evict),
    "h2o": lambda budget, evict: H2OPolicy(budget=budget, window=4, decode_evict=evict),
}


def positions_of(stored: torch.Tensor, full: torch.Tensor) -> list[int]:
    """Original positions of stored key vectors [T, d], found in the full keys [N, d]."""
    distance = (stored[:, None, :] - full[None, :, :]).norm(dim=-1)
    nearest = distance.min(-1)
    assert bool((nearest.values < 1e-4).all())
    return nearest.indices.tolist()


def full_keys(model, ids, mask) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), cache=cache,
              use_cache=True)
    return cache


def test_the_registry_builds_every_method_from_its_own_options():
    assert {"streamingllm", "pyramidkv", "h2o", "uncomp-noprune", "uncomp-uniform"} <= set(available_methods())
    assert make_policy("streamingllm", budget="10%", sinks=4) == StreamingLLMPolicy(budget="10%", sinks=4)
    assert make_policy("pyramidkv", budget="10%", beta=20.0) == PyramidKVPolicy(budget="10%", beta=20.0)
    assert make_policy("h2o", budget="10%") == H2OPolicy(budget="10%")
    profile = make_profile(tiny_model().config)
    noprune = make_policy("uncomp-noprune", profile=profile, budget="10%")
    uniform = make_policy("uncomp-uniform", profile=profile, budget="10%", prefill_compression=True)
    assert isinstance(noprune, UNCompNoPrunePolicy) and not noprune.prefill_compression and not noprune.uniform_heads
    assert isinstance(uniform, UNCompUniformPolicy) and uniform.uniform_heads and uniform.prefill_compression
    assert noprune.describe()["method"] == "uncomp-noprune" and noprune.describe()["prefill_compression"] is False
    assert uniform.describe()["method"] == "uncomp-uniform" and uniform.describe()["uniform_heads"] is True


@pytest.mark.parametrize("method,option,value", [
    ("uncomp-noprune", "prefill_compression", True), ("uncomp-noprune", "prefill_keep", "0.5"),
    ("streamingllm", "window", 8), ("h2o", "kernel", 7), ("snapkv", "sinks", 4), ("full", "budget", "5%"),
])
def test_the_registry_refuses_an_option_the_method_does_not_take(method, option, value):
    with pytest.raises(UncompError, match=f"--{option.replace('_', '-')} applies to .*, not {method}$"):
        make_policy(method, **{option: value})


@pytest.mark.parametrize("name,shape", [("streamingllm", "llama-gqa"), ("pyramidkv", "qwen2-gqa"),
                                        ("h2o", "llama-gqa"), ("h2o", "llama-mha")])
def test_a_budget_that_holds_the_prompt_matches_the_full_cache(name, shape):
    """(With decode_evict the budget is clipped to the prompt, so decoding evicts: not compared.)"""
    model = tiny_model(shape, seed=1)
    ids, mask = left_padded([24, 17], seed=1)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=4)
    with BASELINES[name](10_000, False).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("method", ["uncomp-noprune", "uncomp-uniform"])
def test_ablations_with_a_budget_that_holds_the_prompt_match_the_full_cache(method):
    model = tiny_model("llama-gqa", seed=1)
    ids, mask = left_padded([24, 17], seed=1)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=4)
    # uniform still prunes hidden states unless told not to; noprune never does (and takes no such option)
    off = {"prefill_compression": False} if method == "uncomp-uniform" else {}
    policy = make_policy(method, profile=make_profile(model.config), budget=4096, **off)
    with policy.attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("name,budgets", [
    ("streamingllm", [12] * 4), ("h2o", [12] * 4), ("pyramidkv", pyramid_budgets(12, 40, 4, 4)),
])
def test_kept_tokens_and_bytes_are_the_budgets(name, budgets):
    model = tiny_model("llama-gqa", seed=2)
    ids, mask = left_padded([40, 33], seed=2)
    config = model.config
    with BASELINES[name](12, False).attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=0)
        assert [layer.group_lengths() for layer in cache.layers] == [[b] for b in budgets]
        expected = sum(2 * config.num_key_value_heads * b * config.head_dim * 2 * 4 for b in budgets)
        assert cache.nbytes() == expected
    full = config.num_hidden_layers * 2 * config.num_key_value_heads * 40 * config.head_dim * 2 * 4
    assert cache.nbytes() < full / 2


def test_pyramid_budgets_fall_with_depth_and_average_the_request():
    for budget, prompt, window, layers, beta in [(100, 1000, 32, 30, 20), (100, 150, 32, 30, 20),
                                                 (40, 1000, 32, 4, 20), (200, 1000, 8, 7, 3.5), (33, 999, 32, 30, 20)]:
        kept = pyramid_budgets(budget, prompt, window, layers, beta)
        assert len(kept) == layers and sum(kept) == budget * layers, kept
        assert all(a >= b for a, b in zip(kept, kept[1:])), kept
        assert all(window <= b <= prompt for b in kept), kept
    # The official schedule: beyond the window, the top layer keeps 1/beta of the average share.
    kept = pyramid_budgets(100, 1000, 32, 30, 20)
    assert kept[-1] == 32 + round(68 / 20) and kept[0] == 32 + round(2 * 68 - 68 / 20)
    # A short prompt: the bottom layer keeps it all and the top takes up the difference.
    assert pyramid_budgets(100, 150, 32, 30)[0] == 150
    assert pyramid_budgets(10_000, 150, 32, 30) == [150] * 30
    assert pyramid_budgets(100, 1000, 32, 30, beta=1) == [100] * 30


def test_pyramidkv_with_a_flat_pyramid_is_snapkv():
    model = tiny_model("qwen2-gqa", seed=3)
    ids, mask = left_padded([40, 29], seed=3)
    with PyramidKVPolicy(budget=14, window=4, kernel=3, beta=1).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
    with SnapKVPolicy(budget=14, window=4, kernel=3).attach(model, mask) as cache:
        ref_logits, ref_tokens = greedy(model, ids, mask, cache, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def test_streamingllm_keeps_the_first_real_tokens_and_the_most_recent():
    model = tiny_model("llama-gqa", seed=4)
    lengths, budget, sinks = [30, 22], 12, 3
    ids, mask = left_padded(lengths, seed=4)
    full = full_keys(model, ids, mask)
    with StreamingLLMPolicy(budget=budget, sinks=sinks).attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=0)
    for index, layer in enumerate(cache.layers):
        (group,) = layer.groups
        for row, n in enumerate(lengths):
            pad = 30 - n
            expected = list(range(pad, pad + sinks)) + list(range(30 - (budget - sinks), 30))
            for head in range(model.config.num_key_value_heads):
                assert positions_of(group.keys[row, head], full.layers[index].keys[row, head]) == expected
            assert bool(group.valid[row].all())


def test_streamingllm_decode_evict_keeps_the_sinks_and_a_rolling_window():
    model = tiny_model("llama-mha", seed=5)
    lengths, budget, sinks, steps = [26, 19], 10, 4, 7
    ids, mask = left_padded(lengths, seed=5)
    with StreamingLLMPolicy(budget=budget, sinks=sinks, decode_evict=True).attach(model, mask) as cache:
        _, tokens = greedy(model, ids, mask, cache, steps=steps)
    # Layer 0's keys depend on the token and its position only: compare with the fed sequence.
    fed = torch.cat([ids, tokens[:, :steps]], dim=1)
    full = full_keys(model, fed, torch.cat([mask, torch.ones(2, steps, dtype=torch.long)], dim=1))
    (group,) = cache.layers[0].groups
    total = 26 + steps
    for row, n in enumerate(lengths):
        pad = 26 - n
        expected = list(range(pad, pad + sinks)) + list(range(total - (budget - sinks), total))
        for head in range(model.config.num_key_value_heads):
            assert positions_of(group.keys[row, head], full.layers[0].keys[row, head]) == expected


def test_sink_scores_count_only_real_tokens():
    valid = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    scores = sink_and_recent_scores(valid, batch=2, num_kv_heads=1, n=8, sinks=2)
    kept = select_tokens(scores, budget=5, window=1)
    assert kept[:, 0].tolist() == [[0, 1, 5, 6, 7], [3, 4, 5, 6, 7]]
    assert bool(torch.isinf(scores[1, 0, :3]).all())


def naive_accumulated(query, keys, valid, scaling):
    """Column sums of the whole causal attention matrix, built at once."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(rep, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling  # [B, H_q, N, N]
    n = query.shape[2]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (probs * valid[:, None, :, None]).sum(dim=-2)


def test_h2o_chunked_accumulated_attention_equals_the_full_matrix():
    gen = torch.Generator().manual_seed(6)
    query, keys = torch.randn(2, 4, 13, 8, generator=gen), torch.randn(2, 2, 13, 8, generator=gen)
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    reference = naive_accumulated(query, keys, valid, 0.35)
    for chunk in (1, 3, 5, 13, 64):
        torch.testing.assert_close(accumulated_attention(query, keys, valid, 0.35, chunk), reference)
    no_padding = accumulated_attention(query, keys, None, 0.35, 4)
    torch.testing.assert_close(no_padding, naive_accumulated(query, keys, torch.ones_like(valid), 0.35))
    # Every real query row hands out a total weight of 1.
    torch.testing.assert_close(reference.sum(-1), valid.sum(-1, keepdim=True).float().expand(2, 4))
    # A padded row scores its real tokens as the same prompt alone does.
    alone = accumulated_attention(query[1:, :, 5:], keys[1:, :, 5:], None, 0.35, 2)
    torch.testing.assert_close(reference[1:, :, 5:], alone)


class SpyH2O(H2OScorer):
    def score_prefill(self, query, keys, key_valid, scaling, window_probs):
        scores = super().score_prefill(query, keys, key_valid, scaling, window_probs)
        self.seen.append((scores.clone(), query.clone(), keys.clone()))
        return scores


@pytest.mark.parametrize("aggregate", ["mean", "max"])
def test_h2o_keeps_the_heaviest_hitters_and_the_recent_window(aggregate):
    model = tiny_model("llama-gqa", seed=7)
    ids, mask = left_padded([36, 27], seed=7)
    budget, window, pad = 14, 4, 9
    full = full_keys(model, ids, mask)
    policy = H2OPolicy(budget=budget, window=window, aggregate=aggregate)
    policy.scorer = SpyH2O(window=window, aggregate=aggregate)
    object.__setattr__(policy.scorer, "seen", [])
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=0)
    for index, layer in enumerate(cache.layers):
        scores, query, keys = policy.scorer.seen[index]
        naive = naive_accumulated(query, keys, mask.bool(), model.config.head_dim ** -0.5)
        torch.testing.assert_close(scores[1, :, pad:], aggregate_heads(naive, 2, aggregate)[1, :, pad:])
        (group,) = layer.groups
        for row in range(2):
            for head in range(2):
                kept = positions_of(group.keys[row, head], full.layers[index].keys[row, head])
                assert kept[-window:] == list(range(36 - window, 36))
                chosen = torch.zeros(36 - window, dtype=torch.bool)
                chosen[kept[:-window]] = True
                candidates = scores[row, head, :36 - window]
                assert candidates[chosen].min() >= candidates[~chosen].max()
                if row == 1:
                    assert min(kept) >= pad


@pytest.mark.parametrize("name,evict", [("streamingllm", False), ("streamingllm", True), ("pyramidkv", False),
                                        ("h2o", False), ("h2o", True)])
def test_a_left_padded_batch_gives_each_prompt_its_own_answer(name, evict):
    model = tiny_model("llama-gqa", seed=8)
    lengths = [40, 30]
    ids, mask = left_padded(lengths, seed=8)
    with BASELINES[name](16, evict).attach(model, mask) as cache:
        batch_logits, batch_tokens = greedy(model, ids, mask, cache, steps=4)
    for row, n in enumerate(lengths):
        alone_ids, alone_mask = ids[row:row + 1, -n:], mask[row:row + 1, -n:]
        with BASELINES[name](16, evict).attach(model, alone_mask) as cache:
            logits, tokens = greedy(model, alone_ids, alone_mask, cache, steps=4)
        assert torch.equal(batch_tokens[row], tokens[0])
        torch.testing.assert_close(batch_logits[:, row], logits[:, 0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_compression_changes_the_answer_somewhere(name):
    """Guards the tests above against a policy that silently keeps everything."""
    model = tiny_model("llama-gqa", seed=9)
    ids, mask = left_padded([40], seed=9)
    full, _ = greedy(model, ids, mask, DynamicCache(config=model.config), steps=3)
    with BASELINES[name](8, False).attach(model, mask) as cache:
        small, _ = greedy(model, ids, mask, cache, steps=3)
    assert (small[1:] - full[1:]).abs().max() > 1e-3


def test_uncomp_noprune_never_prunes_and_uncomp_uniform_gives_every_head_the_same_budget():
    model = tiny_model("llama-mha", seed=10)
    ids, mask = left_padded([64], seed=10)
    profile = make_profile(model.config)
    runs = {}
    for method in ("uncomp", "uncomp-noprune", "uncomp-uniform"):
        policy = make_policy(method, profile=profile, budget=24, window=4, kernel=3)
        with policy.attach(model, mask) as cache:
            greedy(model, ids, mask, cache, steps=1)
            runs[method] = (policy.stats(cache)["prefill_tokens_per_layer"],
                            [[g.budget for g in layer.groups] for layer in cache.layers])
    assert runs["uncomp-noprune"][0] == [64] * 4 and runs["uncomp"][0][-1] < 64
    assert runs["uncomp-uniform"][0] == runs["uncomp"][0]  # pruning as uncomp's
    assert all(len(budgets) == 2 for budgets in runs["uncomp"][1])  # two entropy groups per layer
    assert all(len(budgets) == 1 for budgets in runs["uncomp-uniform"][1])
    assert all(len(budgets) == 2 for budgets in runs["uncomp-noprune"][1])


@pytest.mark.parametrize("build,message", [
    (lambda: StreamingLLMPolicy(sinks=-1), "--sinks must be 0 or more"),
    (lambda: PyramidKVPolicy(beta=0.5), "--beta must be at least 1"),
    (lambda: PyramidKVPolicy(kernel=4), "odd"),
    (lambda: H2OPolicy(aggregate="min"), "aggregate"),
    (lambda: make_policy("streamingllm", budget="4", sinks=4), "no room for recent tokens"),
    (lambda: make_policy("h2o", budget="16"), "below the 32-token"),
    (lambda: make_policy("pyramidkv", budget="16"), "below the 32-token"),
])
def test_bad_settings_are_one_clear_error(build, message):
    with pytest.raises(UncompError, match=message):
        build()


def test_streamingllm_budgets_below_the_window_are_fine():
    make_policy("streamingllm", budget="5", sinks=4)  # 4 sinks + 1 recent token
    model = tiny_model("llama-gqa")
    _, mask = left_padded([30])
    policy = StreamingLLMPolicy(budget="10%")  # 3 tokens of 30, no room after the sinks: too short to compress
    with policy.attach(model, mask) as cache:
        assert {group.budget for layer in cache.layers for group in layer.groups} == {30}
    assert policy.stats(cache)["kv_budget_tokens"] == 30 and "kept all 30" in policy.stats(cache)["budget_note"]
    with pytest.raises(UncompError, match="no room for recent tokens after the 4 attention sinks"):
        StreamingLLMPolicy(budget="3")
    assert model.config._attn_implementation == "sdpa"