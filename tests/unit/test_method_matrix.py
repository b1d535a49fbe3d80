"""Every registered method × every tiny model shape × the invariants a cache method must keep.

Generated from the registry: a new method is one module and one registry line, and these tests
cover it with no new test file. Targeted tests of each method stay in their own files.
"""

from __future__ import annotations

import pytest
import torch
from kvloop import assert_each_row_as_alone, greedy, left_padded
from test_profile import make_profile
from tiny import TINY_SHAPES, tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.attention import sliding_windows
from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.options import CATALOGUE
from uncomp_cli.policies.registry import METHODS, available_methods, make_policy, policy_class

SHAPES = sorted(TINY_SHAPES)
BUDGET = 16  # tokens per KV head, on prompts of 40 and 29 tokens
SMALL_SELECTION = {"window": 4, "kernel": 3}  # so a 16-token budget still chooses tokens


def build(method: str, model, **options):
    """The method's policy as the CLI builds it: only the options it takes, and a profile if it needs one."""
    taken = policy_class(method).option_names()
    options = {k: v for k, v in (SMALL_SELECTION | options).items() if k in taken}
    if METHODS[method].needs_profile:
        options["profile"] = make_profile(model.config)
    return make_policy(method, **options)


def bytes_per_token(model, batch: int = 1) -> int:
    """K and V of one token of one KV head, float32."""
    return batch * model.config.head_dim * 2 * 4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", available_methods())
def test_keeping_every_token_is_exactly_the_full_cache(method, shape):
    model = tiny_model(shape, seed=3)
    ids, mask = left_padded([40, 29], seed=3)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=4)
    # A token budget over the prompt keeps every entry in every head (a share such as 100 % is an
    # average that UNComp spreads unevenly over heads); hidden-state pruning is another computation: off.
    policy = build(method, model, budget="10000", prefill_compression=False)
    with policy.attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", available_methods())
def test_the_cache_holds_the_bytes_of_its_budget(method, shape):
    model = tiny_model(shape, seed=4)
    ids, mask = left_padded([40], seed=4)
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    policy = build(method, model, budget=str(BUDGET))
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=0)
        held = cache_nbytes(cache)
    assert held == sum(t.numel() * t.element_size() for t in _stored_tensors(cache))  # real tensors, no mask
    windows = sliding_windows(model.config)
    if any(windows):  # every layer holds what its budget keeps of what it can see (W − 1 tokens if sliding)
        for layer, window in zip(cache.layers, windows):
            visible = 40 if window is None else min(40, window - 1)
            if "budget" not in policy.option_names():
                assert layer.keys.shape[-2] == visible
            elif getattr(policy, "prefill_compression", False):  # pruned layers saw fewer tokens
                assert all(1 <= group.length() <= min(visible, group.budget) for group in layer.groups)
            else:
                assert all(group.length() == min(visible, group.budget) for group in layer.groups)
        return
    tokens_per_head = held / bytes_per_token(model) / (layers * kv_heads)
    if "budget" not in policy.option_names():  # the full cache
        assert tokens_per_head == 40
    elif policy.needs_profile:  # the profile spreads the average over heads, rounding each
        assert abs(tokens_per_head - BUDGET) <= 0.5
    else:  # uniform, per-layer (PyramidKV) or per-head (AdaKV) budgets that average the request exactly
        assert tokens_per_head == BUDGET


def _stored_tensors(cache) -> list[torch.Tensor]:
    if hasattr(cache.layers[0], "groups"):
        return [t for layer in cache.layers for g in layer.groups for t in (g.keys, g.values)]
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", available_methods())
def test_a_left_padded_batch_gives_each_row_what_it_gives_alone(method, shape):
    model = tiny_model(shape, seed=5)
    lengths = [40, 29]
    ids, mask = left_padded(lengths, seed=5)
    policy = build(method, model, budget=str(BUDGET))
    with policy.attach(model, mask) as cache:
        batch_logits, batch_tokens = greedy(model, ids, mask, cache, steps=4)
    assert_each_row_as_alone(model, policy, ids, mask, batch_logits, batch_tokens, steps=4)


@pytest.mark.parametrize("method", available_methods())
def test_an_option_the_method_does_not_take_is_refused_by_name(method):
    foreign = next(name for name in CATALOGUE if name not in policy_class(method).option_names())
    with pytest.raises(UncompError, match=rf"^{CATALOGUE[foreign].flag} applies to .+, not {method}$"):
        make_policy(method, **{foreign: CATALOGUE[foreign].default})
    with pytest.raises(UncompError, match=rf"^--colour is not an option of any method, not {method}$"):
        make_policy(method, colour="red")
