"""Hidden-state pruning at prefill: later layers run on the tokens the previous layer's last
queries attended to most, with their original positions."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from kvloop import greedy, left_padded
from tiny import TINY_SHAPES, tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.attention import sliding_windows, use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.plan import CachePlan, PruneSchedule
from uncomp_cli.engine.prefill import HiddenStatePruner, parse_keep_fractions, spans_keep, validate_layer_keep
from uncomp_cli.engine.selection import PRUNE_WINDOW
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.uncomp import UNCompPolicy

SHAPES = sorted(TINY_SHAPES)
KEEP = [1.0, 1.0, 0.6, 0.4]


def pruned_cache(model, tokens: int, keep, layers: str = "last") -> GroupedKVCache:
    """A cache of ``tokens`` per KV head whose plan prunes to ``keep``."""
    plan = CachePlan.uniform(budgets(model, tokens))
    return GroupedKVCache(CachePlan.build(plan.layers, PruneSchedule(layer_keep=tuple(keep), layers=layers)))


def budgets(model, tokens: int) -> torch.Tensor:
    return torch.full((model.config.num_hidden_layers, model.config.num_key_value_heads), tokens)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lengths", [[26], [26, 19]], ids=["single", "left-padded"])
def test_keeping_every_token_is_identical_to_the_full_cache(shape, lengths):
    model = tiny_model(shape)
    ids, mask = left_padded(lengths, seed=1)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config))
    policy = UNCompPolicy(budgets(model, 10_000), layer_keep=[1.0] * 4)
    with policy.attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert policy.stats(cache)["prefill_tokens_per_layer"] == [26] * 4


def manual_forward(model, ids: torch.Tensor, kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """Reference: run the decoder layers by hand on the kept tokens with their original positions,
    each with its own RoPE (Gemma 3: per layer type) and a causal mask by position (sliding layers:
    the last W positions). ids: [1, N] -> last logits [1, V]."""
    base, config = model.model, model.config
    hidden = base.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])
    types = getattr(config, "layer_types", None)
    by_type = "layer_type" in inspect.signature(base.rotary_emb.forward).parameters
    index = positions
    for number, (layer, window) in enumerate(zip(base.layers, sliding_windows(config))):
        cos, sin = base.rotary_emb(hidden, positions[None], *([types[number]] if by_type else []))
        if number in kept:
            new = kept[number][0]
            hidden = hidden[:, torch.searchsorted(index, new)]
            index = new
        allowed = index[None, :] <= index[:, None]
        if window is not None:
            allowed &= index[:, None] - index[None, :] < window
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
        hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos[:, index], sin[:, index]),
                       position_ids=index[None])
    logits = model.lm_head(base.norm(hidden))[:, -1]
    cap = getattr(config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


@pytest.mark.parametrize("shape, layers", [(shape, "last") for shape in SHAPES] + [("llama-gqa", "span"),
                                                                                    ("gemma3-gqa", "span")])
def test_pruned_prefill_equals_running_the_layers_on_the_kept_tokens(shape, layers):
    model = tiny_model(shape, seed=2)
    ids, mask = left_padded([40], seed=2)
    cache = pruned_cache(model, 10_000, KEEP, layers)
    pruner = HiddenStatePruner(model, cache)
    with torch.no_grad(), use_grouped_cache(model, cache), pruner:
        logits, _ = greedy(model, ids, mask, cache, steps=0)
    kept = pruner.kept_positions
    assert sorted(kept) == [2, 3]
    assert kept[2].shape == (1, 24) and kept[3].shape == (1, 16)  # ceil(0.6 · 40), ceil(0.4 · 40)
    assert set(kept[3][0].tolist()) <= set(kept[2][0].tolist())
    for index in kept.values():
        assert index[0].tolist() == sorted(index[0].tolist())
        assert index[0, -PRUNE_WINDOW:].tolist() == list(range(40 - PRUNE_WINDOW, 40))
    ran_on = [torch.arange(40), torch.arange(40), kept[2][0], kept[3][0]]
    for layer, tokens, window in zip(cache.layers, ran_on, sliding_windows(model.config)):
        visible = tokens if window is None else tokens[tokens >= 40 + 1 - window]  # what the next query sees
        assert layer.group_lengths() == [len(visible)]
    with torch.no_grad():
        reference = manual_forward(model, ids, kept)
    torch.testing.assert_close(logits[0], reference, atol=1e-5, rtol=0)
    full, _ = greedy(model, ids, mask, DynamicCache(config=model.config), steps=0)
    assert (full[0] - reference).abs().max() > 1e-4  # pruning did change the computation


class SpyPruner(HiddenStatePruner):
    """Records the scores each pruning decision was made from."""

    def _prune(self, index, hidden, state):
        self.scores[index] = state.evidence.clone()
        self.before[index] = state.index.clone()
        return super()._prune(index, hidden, state)


def test_the_most_attended_tokens_and_the_observation_window_are_kept():
    model = tiny_model("llama-gqa", seed=3)
    ids, mask = left_padded([50], seed=3)
    cache = pruned_cache(model, 10_000, [1.0, 0.7, 0.7, 0.3])
    pruner = SpyPruner(model, cache)
    pruner.scores, pruner.before = {}, {}
    with torch.no_grad(), use_grouped_cache(model, cache), pruner:
        greedy(model, ids, mask, cache, steps=0)
    assert sorted(pruner.scores) == [1, 3]
    for layer, scores in pruner.scores.items():
        before, after = pruner.before[layer][0], pruner.kept_positions[layer][0]
        n = before.shape[0]
        chosen = torch.isin(before, after)
        assert int(chosen.sum()) == math.ceil(50 * pruner.keep[layer])
        assert bool(chosen[-PRUNE_WINDOW:].all()), "the observation window always survives"
        candidates, picked = scores[0, : n - PRUNE_WINDOW], chosen[: n - PRUNE_WINDOW]
        assert candidates[picked].min() >= candidates[~picked].max(), "the most attended tokens survive"
        assert bool(picked[candidates.argmax()])


class LayerSpy(SpyPruner):
    """Also records the scores every layer left."""

    def _gather_evidence(self, index, state):
        if (scores := self.cache.layers[index - 1]._prune_scores) is not None:  # a peek: the pruner takes them
            self.per_layer[index - 1] = scores.clone()
        super()._gather_evidence(index, state)


@pytest.mark.parametrize("layers, scored", [("last", [1, 2]), ("span", [0, 1, 2])])
def test_a_pruning_point_is_decided_by_the_layer_before_it_or_by_every_layer_since_the_last(layers, scored):
    model = tiny_model("llama-gqa", seed=3)
    ids, mask = left_padded([50], seed=3)
    cache = pruned_cache(model, 10_000, [1.0, 1.0, 0.7, 0.3], layers)
    pruner = LayerSpy(model, cache)
    pruner.scores, pruner.before, pruner.per_layer = {}, {}, {}
    with torch.no_grad(), use_grouped_cache(model, cache), pruner:
        greedy(model, ids, mask, cache, steps=0)
    assert sorted(pruner.per_layer) == scored
    first = pruner.per_layer[1] + (pruner.per_layer[0] if layers == "span" else 0)
    torch.testing.assert_close(pruner.scores[2], first)
    torch.testing.assert_close(pruner.scores[3], pruner.per_layer[2])
    if layers == "span":
        assert not torch.equal(pruner.per_layer[0], pruner.per_layer[1])  # two layers' evidence, not one twice
    assert [i for i, layer in enumerate(cache.plan.layers) if layer.prune_heads] == scored  # the plan said so
    assert all(layer.take_prune_scores() is None for layer in cache.layers)  # none left behind on exit


def test_an_unknown_pruning_evidence_is_refused():
    model = tiny_model("llama-gqa")
    with pytest.raises(UncompError, match="--prune-layers must be one of last, span"):
        pruned_cache(model, 8, KEEP, layers="all")
    with pytest.raises(UncompError, match="no pruning schedule"):
        HiddenStatePruner(model, GroupedKVCache(CachePlan.uniform(budgets(model, 8))))


def test_a_left_padded_batch_is_pruned_and_compressed_like_each_prompt_alone():
    model = tiny_model("llama-gqa", seed=4)
    lengths = [37, 24]
    ids, mask = left_padded(lengths, seed=4)
    policy = UNCompPolicy(torch.tensor([[14, 14], [18, 12], [10, 14], [12, 12]]), layer_keep=KEEP,
                          window=4, kernel=3)
    with policy.attach(model, mask) as cache:
        batch_logits, batch_tokens = greedy(model, ids, mask, cache, steps=8)
    assert policy.stats(cache)["prefill_tokens_per_layer"] == [37, 37, 23, 15]  # the longer row's counts
    for row, n in enumerate(lengths):
        alone_ids, alone_mask = ids[row:row + 1, -n:], mask[row:row + 1, -n:]
        with policy.attach(model, alone_mask) as cache:
            logits, tokens = greedy(model, alone_ids, alone_mask, cache, steps=8)
        assert policy.stats(cache)["prefill_tokens_per_layer"] == [n, n, math.ceil(0.6 * n), math.ceil(0.4 * n)]
        assert torch.equal(batch_tokens[row], tokens[0])
        torch.testing.assert_close(batch_logits[:, row], logits[:, 0], atol=1e-4, rtol=0)


def test_decoding_is_not_pruned_and_positions_count_the_whole_prompt():
    model = tiny_model("qwen2-gqa", seed=5)
    ids, mask = left_padded([30], seed=5)
    policy = UNCompPolicy(budgets(model, 10_000), layer_keep=KEEP)
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=5)
        assert policy.stats(cache)["prefill_tokens_per_layer"] == [30, 30, 18, 12]
        assert [layer.group_lengths()[0] for layer in cache.layers] == [35, 35, 23, 17]
        assert [layer.get_seq_length() for layer in cache.layers] == [35] * 4


@pytest.mark.parametrize("keep,message", [
    ([1.0, 0.5], "2 fractions but the model has 4"),
    ([0.9, 0.9, 0.5, 0.5], "layer 0 is never pruned"),
    ([1.0, 0.5, 0.8, 0.5], "must not rise"),
    ([1.0, 1.0, 0.0, 0.0], r"in \(0, 1\]"),
    ([1.0, 1.0, 1.5, 1.0], r"in \(0, 1\]"),
])
def test_bad_schedules_are_refused(keep, message):
    with pytest.raises(UncompError, match=message):
        validate_layer_keep(keep, 4)


def test_hooks_are_removed_even_when_the_body_raises():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([30])
    cache = pruned_cache(model, 10, KEEP)
    assert [layer.prune_heads for layer in cache.plan.layers] == [None, "sum", "sum", None]  # before each point
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), use_grouped_cache(model, cache), HiddenStatePruner(model, cache):
            assert all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)
            greedy(model, ids, mask, cache, steps=0)
            raise RuntimeError("boom")
    assert all(len(layer._forward_pre_hooks) == 0 for layer in model.model.layers)
    assert all(layer.take_prune_scores() is None for layer in cache.layers)


def test_keep_spans_cut_the_prunable_layers_evenly_with_longer_spans_last():
    assert spans_keep(30, 8, [0.75, 0.5, 0.35]) == [1.0] * 8 + [0.75] * 7 + [0.5] * 7 + [0.35] * 8
    assert spans_keep(4, 1, "0.5") == [1.0, 0.5, 0.5, 0.5]
    assert spans_keep(5, 1, [0.9, 0.6]) == [1.0, 0.9, 0.9, 0.6, 0.6]


@pytest.mark.parametrize(("fractions", "message"), [
    ("0.5,0.75", "must not rise"),
    ("1.5", r"must be in \(0, 1\]"),
    ("0", r"must be in \(0, 1\]"),
    ("half", "takes fractions such as"),
    ("", "takes fractions such as"),
])
def test_bad_keep_fractions_are_refused_in_one_line(fractions, message):
    with pytest.raises(UncompError, match=message):
        parse_keep_fractions(fractions)


def test_more_spans_than_prunable_layers_is_an_error():
    with pytest.raises(UncompError, match="3 spans but only 2 layers"):
        spans_keep(4, 2, [0.9, 0.8, 0.7])


def test_prefill_keep_replaces_the_profile_stages_and_prunes_as_scheduled():
    from uncomp_cli.profile.reference import reference_profile

    model = tiny_model("llama-gqa")  # 4 layers: the first pruned layer is layer 1
    ids, mask = left_padded([96], seed=3)
    profile = reference_profile(model.config, "tiny")
    policy = UNCompPolicy(profile=profile, budget=1000, window=4, kernel=3, prefill_keep="0.5")
    _, schedule = policy.resolve(model, mask)
    assert schedule == {"layer_keep": [1.0, 0.5, 0.5, 0.5]}
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=2)
    assert policy.stats(cache)["prefill_tokens_per_layer"] == [96, 48, 48, 48]
    assert policy.describe()["prefill_keep"] == [0.5]
    off = UNCompPolicy(profile=profile, budget=1000, prefill_keep="0.5", prefill_compression=False)
    assert off.resolve(model, mask)[1] is None


def test_each_stored_token_knows_its_original_position():
    """Positions come from the model's position ids, so a pruned layer's survivors keep theirs."""
    model = tiny_model("llama-gqa", seed=6)
    ids, mask = left_padded([30], seed=6)
    policy = UNCompPolicy(budgets(model, 10_000), layer_keep=KEEP, window=4, kernel=3)
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=3)
        for index, layer in enumerate(cache.layers):
            (group,) = layer.groups
            stored = group.positions[0, 0].tolist()
            prompt, decoded = stored[: len(stored) - 3], stored[len(stored) - 3:]
            assert decoded == [30, 31, 32]  # appended at the uncompressed positions
            assert prompt == sorted(prompt) and len(prompt) == math.ceil(KEEP[index] * 30)
            assert prompt[-4:] == [26, 27, 28, 29]  # the last tokens always survive pruning
            assert bool((group.positions[0] == group.positions[0, :1]).all())  # heads of a group agree here
