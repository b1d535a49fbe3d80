"""A head group's pre-allocated storage: decoding writes new tokens into slack instead of copying
the group, the slack stays small, and a saved state never sees what was written after it."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.engine.generation import full_kv_cache_bytes
from uncomp_cli.engine.groups import GROWTH_DIVISOR, MIN_GROWTH, HeadGroup
from uncomp_cli.policies.full import FullCachePolicy
from uncomp_cli.policies.pyramidkv import PyramidKVPolicy
from uncomp_cli.policies.snapkv import SnapKVPolicy


def tokens(count: int, start: int, heads: int = 2, dim: int = 4):
    """keys, values, valid, positions for ``count`` tokens whose values identify them."""
    keys = torch.arange(start, start + count, dtype=torch.float32)[None, None, :, None].expand(1, heads, count, dim)
    positions = torch.arange(start, start + count)[None, None].expand(1, heads, count)
    return keys.clone(), -keys.clone(), torch.ones(1, heads, count, dtype=torch.bool), positions.clone()


def stored_positions(group: HeadGroup) -> list[int]:
    return group.positions[0, 0].tolist()


def test_appends_fill_the_slack_in_place_and_grow_by_a_sixteenth():
    group = HeadGroup([0, 1], budget=None)
    group.store(*tokens(320, 0))
    assert group.capacity() == 320 and group.reserved_nbytes() == group.nbytes()  # no slack after a prefill
    group.append(*tokens(1, 320), all_valid=True)
    grown = group.capacity()
    assert grown == 321 + max(MIN_GROWTH, 321 // GROWTH_DIVISOR)
    buffer = group.keys.data_ptr()
    for step in range(321, grown):
        group.append(*tokens(1, step), all_valid=True)
        assert group.keys.data_ptr() == buffer  # written in place, no copy of the group
    assert group.capacity() == grown and group.length() == grown
    assert stored_positions(group) == list(range(grown))
    assert torch.equal(group.keys[0, 1, :, 0], torch.arange(grown, dtype=torch.float32))
    assert torch.equal(group.values, -group.keys)
    per_token = 2 * 2 * 4 * 4  # K and V, 2 heads, head_dim 4, float32
    assert group.nbytes() == grown * per_token == group.reserved_nbytes()


def test_a_saved_state_keeps_its_tokens_while_later_appends_write_the_slack():
    group = HeadGroup([0, 1], budget=None)
    group.store(*tokens(40, 0))
    group.append(*tokens(1, 40), all_valid=True)  # now with slack
    saved = group.snapshot()  # what engine.checkpoint keeps
    for answer in (100, 200):  # two answers on the same saved state, each dropped afterwards
        live = saved.snapshot()  # what engine.checkpoint restores
        live.append(*tokens(5, answer), all_valid=True)
        assert stored_positions(live) == list(range(41)) + list(range(answer, answer + 5))
        assert stored_positions(saved) == list(range(41)) and saved.length() == 41


def test_a_padded_append_clears_the_fast_path():
    group = HeadGroup([0], budget=None)
    group.store(*tokens(8, 0, heads=1))
    keys, values, valid, positions = tokens(1, 8, heads=1)
    group.append(keys, values, ~valid, positions, all_valid=False)
    assert not group.all_valid and group.valid[0, 0].tolist() == [True] * 8 + [False]


@pytest.mark.parametrize("shape", ["llama-gqa", "qwen2-gqa"])
def test_a_long_decode_through_several_growths_matches_the_dynamic_cache(shape):
    model = tiny_model(shape)
    ids = torch.randint(3, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad():
        reference = model.generate(ids, cache=DynamicCache(config=model.config), **settings)
        with SnapKVPolicy(budget=10_000).attach(model, settings["attention_mask"]) as cache:
            ours = model.generate(ids, cache=cache, **settings)
    assert torch.equal(ours, reference)
    group = cache.layers[0].groups[0]
    assert group.length() == 30 + 59  # grown several times: a growth adds 16 tokens here
    assert group.nbytes() <= group.reserved_nbytes() <= group.nbytes() * (1 + 1 / GROWTH_DIVISOR) + \
        MIN_GROWTH * group.nbytes() // group.length()


@pytest.mark.parametrize("policy", [SnapKVPolicy(budget=8, window=4, kernel=3),
                                    PyramidKVPolicy(budget=12, window=4, kernel=3)], ids=["snapkv", "pyramidkv"])
def test_what_admission_reserves_bounds_the_buffers_after_a_long_decode(policy):
    """The server admits by ``policy.held_tokens``: the buffers, slack included, never exceed it."""
    model = tiny_model("llama-gqa")
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(5))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=70, min_new_tokens=70, do_sample=False,
                    pad_token_id=0)
    with torch.no_grad(), policy.attach(model, settings["attention_mask"]) as cache:
        model.generate(ids, cache=cache, **settings)
    stored = cache_nbytes(cache)
    assert cache_nbytes(cache, reserved=True) > stored  # decoding left slack
    per_token = full_kv_cache_bytes(model.config, 1, 1, model.dtype)
    mean_tokens = -(-stored // per_token)  # tokens per KV head, over every layer and head
    assert cache_nbytes(cache, reserved=True) <= per_token * policy.held_tokens(mean_tokens)
    assert FullCachePolicy().held_tokens(mean_tokens) == mean_tokens  # DynamicCache: no slack


def test_nested_checkpoints_never_see_each_others_tokens():
    """A state saved after tokens were written into slack stays intact when an earlier state is
    restored and written again (engine.checkpoint keeps snapshots)."""
    first = HeadGroup([0, 1], budget=None)
    first.store(*tokens(40, 0))
    first.append(*tokens(1, 40), all_valid=True)  # a buffer with slack
    saved_a = first.snapshot()
    first.append(*tokens(3, 100), all_valid=True)  # written into the slack
    saved_b = first.snapshot()
    again = saved_a.snapshot()  # restore A and write other tokens where B's went
    again.append(*tokens(3, 200), all_valid=True)
    assert stored_positions(saved_b) == list(range(41)) + [100, 101, 102]
    assert stored_positions(again) == list(range(41)) + [200, 201, 202]
