"""The compressed policies: registry, settings, what attach() changes and puts back."""

from __future__ import annotations

import json

import pytest
import torch
from kvloop import greedy, left_padded
from tiny import tiny_model
from transformers import DynamicCache

from uncomp_cli.errors import UncompError
from uncomp_cli.policies import available_methods, make_policy
from uncomp_cli.policies.snapkv import SnapKVPolicy
from uncomp_cli.policies.uncomp import UNCompPolicy


def uneven(model) -> torch.Tensor:
    """Per-KV-head budgets that differ within layers: [L, H_kv]."""
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    return torch.arange(layers * heads).reshape(layers, heads) % 3 * 6 + 10


def test_registry_builds_the_compressed_policies():
    assert {"snapkv", "uncomp"} <= set(available_methods())
    assert make_policy("snapkv", budget="5%") == SnapKVPolicy(budget="5%")
    policy = make_policy("uncomp", kv_head_budgets=torch.full((4, 2), 16), layer_keep=[1, 1, 0.5, 0.5])
    assert isinstance(policy, UNCompPolicy) and policy.name == "uncomp"


POLICIES = {
    "snapkv": lambda model: SnapKVPolicy(budget=12, window=4, kernel=3),
    "snapkv-evict-avg": lambda model: SnapKVPolicy(budget=12, window=4, kernel=5, pooling="avg",
                                                   aggregate="max", decode_evict=True),
    "uncomp": lambda model: UNCompPolicy(uneven(model), window=4, kernel=3),
    "uncomp-pruned-evict": lambda model: UNCompPolicy(uneven(model), layer_keep=[1, 0.8, 0.8, 0.5], window=4,
                                                      kernel=3, decode_evict=True),
}


@pytest.mark.parametrize("shape", ["llama-gqa", "llama-mha", "mistral-gqa", "qwen2-gqa"])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_generates_with_less_memory_than_the_full_cache(name, shape):
    model = tiny_model(shape)
    ids, mask = left_padded([40, 31], seed=9)
    policy = POLICIES[name](model)
    with policy.attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
        stored = cache.nbytes()
        lengths = [length for layer in cache.layers for length in layer.group_lengths()]
    assert bool(torch.isfinite(logits).all())
    config = model.config
    full = config.num_hidden_layers * 2 * config.num_key_value_heads * 44 * config.head_dim * 2 * 4
    assert 0 < stored < full / 2
    assert max(lengths) <= 22 + 4  # the largest budget plus the decoded tokens
    if policy.decode_evict:
        assert max(lengths) <= 22
    json.dumps(policy.describe())


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_attach_restores_the_attention_implementation_even_when_the_body_raises(name):
    model = tiny_model("llama-gqa")
    model.set_attn_implementation("eager")
    ids, mask = left_padded([20])
    with pytest.raises(RuntimeError, match="boom"):
        with POLICIES[name](model).attach(model, mask) as cache:
            assert model.config._attn_implementation == "uncomp"
            greedy(model, ids, mask, cache, steps=1)
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    layers = model.model.layers
    assert not any(hasattr(layer.self_attn, "_uncomp_cache") for layer in layers)
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers)
    assert all(layer.self_attn.config._attn_implementation == "eager" for layer in layers)


def test_snapkv_budget_share_is_of_the_longest_prompt():
    model = tiny_model("llama-gqa")
    _, mask = left_padded([300, 200])
    policy = SnapKVPolicy(budget="10%", window=8)
    with policy.attach(model, mask) as cache:
        assert {group.budget for layer in cache.layers for group in layer.groups} == {30}
    assert policy.stats(cache) == {"kv_budget_tokens": 30}


def test_snapkv_refuses_a_token_budget_below_the_window_before_touching_the_model():
    with pytest.raises(UncompError, match="below the 32-token observation window"):
        SnapKVPolicy(budget="16")


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "h2o", "adakv", "streamingllm"])
def test_a_share_too_small_to_compress_keeps_the_whole_prompt_and_says_so(method):
    model = tiny_model("llama-gqa")
    ids, mask = left_padded([300])
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config))
    policy = make_policy(method, budget="1%")  # 3 tokens of 300, under the 32-token window (or 4 sinks + 1)
    with policy.attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache)
        assert {group.budget for layer in cache.layers for group in layer.groups} == {300}
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    stats = policy.stats(cache)
    assert stats.get("kv_budget_tokens", stats.get("kv_budget_tokens_mean")) == 300
    floor = 5 if method == "streamingllm" else 32
    assert stats["budget_note"] == (f"budget 1% of this 300-token prompt is 3 tokens, under the {floor} the method "
                                    "keeps at least: too short to compress, kept all 300")
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("kwargs,message", [
    ({"kernel": 8}, "odd"), ({"pooling": "sum"}, "pooling"), ({"aggregate": "min"}, "aggregate"),
    ({"window": 0}, "window"),
])
def test_policy_settings_are_validated_at_construction(kwargs, message):
    with pytest.raises(UncompError, match=message):
        SnapKVPolicy(**kwargs)
    with pytest.raises(UncompError, match=message):
        UNCompPolicy(torch.full((4, 2), 16), **kwargs)


@pytest.mark.parametrize("budgets,message", [
    (torch.full((4, 2), 16.0), "integer tokens"),
    (torch.full((4,), 16), "shaped"),
    (torch.tensor([[16, 0]] * 4), "at least 1 token"),
])
def test_uncomp_budgets_are_validated(budgets, message):
    with pytest.raises(UncompError, match=message):
        UNCompPolicy(budgets)


@pytest.mark.parametrize("kwargs,message", [
    ({"kv_head_budgets": torch.full((4, 4), 16)}, r"shaped \(4, 4\) but the model has 4 layers × 2 KV heads"),
    ({"kv_head_budgets": torch.full((4, 2), 16), "layer_keep": [1.0, 0.5]}, "2 fractions"),
])
def test_uncomp_profile_must_fit_the_model(kwargs, message):
    model = tiny_model("llama-gqa")
    _, mask = left_padded([20])
    with pytest.raises(UncompError, match=message):
        with UNCompPolicy(**kwargs).attach(model, mask):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_architectures_are_refused_by_name():
    from transformers import AutoModelForCausalLM, GPT2Config

    from uncomp_cli.errors import UncompError
    from uncomp_cli.policies import make_policy

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    mask = torch.ones(1, 8, dtype=torch.long)
    with pytest.raises(UncompError, match=r"support llama, .*phi3 models; this model is 'gpt2'"):
        with make_policy("snapkv", budget="100%").attach(model, mask):
            pass
    assert model.config._attn_implementation != "uncomp"
