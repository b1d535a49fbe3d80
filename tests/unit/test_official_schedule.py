"""The official code's absolute pruning schedule and ``--preset official``."""

from __future__ import annotations

import pytest
import torch
from kvloop import assert_each_row_as_alone, greedy, left_padded
from test_profile import make_profile
from tiny import tiny_model

from uncomp_cli.errors import UncompError
from uncomp_cli.policies.registry import make_policy
from uncomp_cli.policies.uncomp import UNLIMITED, official_layer_tokens


def test_the_schedule_reproduces_the_official_llama2_counts():
    stages = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    counts = official_layer_tokens(stages, first_pruned=1, max_len=4096)
    assert counts == [UNLIMITED, 4096, 4096, 3456, 3456, 2816, 2816, 2176, 2176, 1536, 1536]


def test_layers_before_the_first_pruned_one_and_single_stage_profiles_are_not_pruned():
    assert official_layer_tokens(torch.tensor([0, 1, 1, 2]), first_pruned=2, max_len=1024)[:2] == [UNLIMITED] * 2
    assert official_layer_tokens(torch.tensor([0, 0, 0]), first_pruned=1, max_len=1024) == [UNLIMITED] * 3
    assert official_layer_tokens(torch.tensor([0, 0, 1, 2]), first_pruned=1, max_len=64) == [UNLIMITED, 44, 34, 24]


def _official(model, **options):
    return make_policy("uncomp", preset="official", profile=make_profile(model.config), **options)


def test_each_layer_runs_on_at_most_its_count_and_a_shorter_prompt_keeps_what_it_has():
    model = tiny_model("llama-gqa", seed=7)
    ids, mask = left_padded([40], seed=7)
    # the tiny profile's stages are 0, 1, 2, 2: at most 42, 30 and 30 tokens from layer 1 on
    policy = _official(model, prefill_max_len=80, prefill_from=1, budget="10000", window=4, kernel=3)
    with policy.attach(model, mask) as cache:
        greedy(model, ids, mask, cache, steps=0)
        ran_on = cache.prefill_tokens_per_layer()
    assert ran_on == [40, 40, 30, 30]  # layer 0 is never pruned; layer 1's 42 is more than the prompt has


def test_a_left_padded_batch_is_pruned_row_by_row_as_each_row_alone():
    model = tiny_model("qwen2-gqa", seed=8)
    lengths = [40, 29]
    ids, mask = left_padded(lengths, seed=8)
    policy = _official(model, prefill_max_len=48, budget="16", window=4, kernel=3)
    with policy.attach(model, mask) as cache:
        batch_logits, batch_tokens = greedy(model, ids, mask, cache, steps=4)
    assert_each_row_as_alone(model, policy, ids, mask, batch_logits, batch_tokens, steps=4)


def test_the_preset_is_the_official_configuration_and_given_options_override_it():
    policy = make_policy("uncomp", preset="official")
    assert (policy.window, policy.kernel, policy.pooling, policy.decode_evict) == (8, 7, "max", True)
    assert (policy.prefill_schedule, policy.prefill_from, policy.preset) == ("official", 2, "official")
    assert make_policy("uncomp", preset="official", window=16).window == 16
    noprune = make_policy("uncomp-noprune", preset="official")  # takes what it can: selection, eviction
    assert (noprune.window, noprune.pooling, noprune.prefill_compression) == (8, "max", False)
    assert make_policy("uncomp", preset="official").describe()["preset"] == "official"


@pytest.mark.parametrize("method, options, message", [
    ("uncomp", {"preset": "fastest"}, "--preset must be one of official"),
    ("snapkv", {"preset": "official"}, "--preset applies to uncomp"),
    ("uncomp", {"prefill_schedule": "steep"}, "--prefill-schedule must be fraction or official"),
    ("uncomp", {"prefill_schedule": "official", "prefill_keep": "0.5"}, "does not go with"),
    ("uncomp", {"prefill_from": 0}, "layer 0 is never pruned"),
    ("uncomp", {"prefill_max_len": 0}, "--prefill-max-len must be at least 1"),
])
def test_bad_schedule_settings_are_refused(method, options, message):
    with pytest.raises(UncompError, match=message):
        make_policy(method, **options)


def test_pruning_from_a_layer_past_the_model_is_refused():
    model = tiny_model("llama-gqa", seed=7)
    ids, mask = left_padded([40], seed=7)
    with pytest.raises(UncompError, match="leaves nothing to prune"):
        with _official(model, prefill_from=4, budget="16").attach(model, mask):
            pass
