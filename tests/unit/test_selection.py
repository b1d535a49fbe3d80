"""Scoring and top-k: the pure functions every compression method shares."""

from __future__ import annotations

import pytest
import torch

from uncomp_cli.engine.selection import (
    SnapKVScorer,
    aggregate_heads,
    pool_scores,
    prune_scores,
    resolve_budget,
    select_rows,
    select_tokens,
    snapkv_scores,
    window_attention,
)
from uncomp_cli.errors import UncompError


def full_attention_rows(query, keys, valid, scaling, rows):
    """Brute force: the full causal N × N softmax with padding masked, last ``rows`` rows."""
    rep = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(rep, dim=1)
    logits = query @ k.transpose(-1, -2) * scaling
    n = keys.shape[2]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.nan_to_num(probs)[:, :, -rows:]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2)])
def test_window_attention_equals_the_last_rows_of_full_attention(heads, kv_heads):
    torch.manual_seed(0)
    query, keys = torch.randn(2, heads, 20, 8), torch.randn(2, kv_heads, 20, 8)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False  # left padding
    got = window_attention(query[:, :, -5:], keys, valid, 8**-0.5)
    want = full_attention_rows(query, keys, valid, 8**-0.5, 5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert got.shape == (2, heads, 5, 20)
    assert bool((got[1, :, :, :6] == 0).all()), "padding must get no probability"
    assert bool((got[:, :, 0, -4:] == 0).all()), "the first window row must not see later tokens"


def test_window_attention_zeroes_padding_query_rows():
    torch.manual_seed(0)
    query, keys = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    valid = torch.tensor([[False, False, True, True]])
    probs = window_attention(query, keys, valid, 1.0, query_valid=valid)
    assert bool(torch.isfinite(probs).all())
    assert bool((probs[:, :, :2] == 0).all())
    torch.testing.assert_close(probs[:, :, 2:].sum(-1), torch.ones(1, 2, 2))


def test_aggregate_heads_groups_consecutive_query_heads():
    scores = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 9.0], [7.0, 1.0]]])  # [1, H_q=4, N=2]
    torch.testing.assert_close(aggregate_heads(scores, 2, "mean"), torch.tensor([[[2.0, 1.0], [6.0, 5.0]]]))
    torch.testing.assert_close(aggregate_heads(scores, 2, "max"), torch.tensor([[[3.0, 2.0], [7.0, 9.0]]]))
    with pytest.raises(UncompError, match="aggregation"):
        aggregate_heads(scores, 2, "median")


def test_max_pooling_spreads_a_peak_to_its_neighbours_and_keeps_length():
    scores = torch.zeros(1, 1, 9)
    scores[..., 4] = 1.0
    pooled = pool_scores(scores, kernel=3, pooling="max")
    assert pooled.shape == scores.shape
    assert pooled[0, 0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert pool_scores(scores, kernel=1).data_ptr() == scores.data_ptr()


def test_pooling_treats_padding_like_the_edge_of_the_sequence():
    alone = torch.tensor([[[0.5, 0.1, 0.2, 0.9]]])
    padded = torch.cat([torch.full((1, 1, 3), 0.0), alone], dim=-1)
    valid = torch.tensor([[[False] * 3 + [True] * 4]])
    for pooling in ("max", "avg"):
        pooled = pool_scores(padded, 3, pooling, valid)
        torch.testing.assert_close(pooled[..., 3:], pool_scores(alone, 3, pooling))


def test_select_tokens_keeps_the_window_and_the_top_scores_in_order():
    scores = torch.tensor([[[0.1, 5.0, 0.2, 4.0, 0.3, 0.0, 0.0, 0.0]]])
    index = select_tokens(scores, budget=5, window=3)
    assert index.tolist() == [[[1, 3, 5, 6, 7]]]
    assert select_tokens(scores, budget=20, window=3).tolist() == [[list(range(8))]]


def test_select_tokens_never_picks_minus_infinity_while_others_remain():
    scores = torch.tensor([[[float("-inf"), float("-inf"), 0.1, 0.2, 0.0, 0.0]]])
    assert select_tokens(scores, budget=4, window=2).tolist() == [[[2, 3, 4, 5]]]


def test_select_tokens_is_per_head():
    scores = torch.tensor([[[9.0, 0.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0]]])
    assert select_tokens(scores, budget=2, window=1).tolist() == [[[0, 3], [1, 3]]]


def test_select_rows_gives_each_row_its_own_count_with_fillers_first():
    inf = float("-inf")
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
                           [inf, inf, 0.5, 0.1, 0.2, 0.3]])
    index, kept = select_rows(scores, torch.tensor([4, 3]), window=2)
    assert index[0].tolist() == [0, 2, 4, 5] and kept[0].all()
    assert index[1, 1:].tolist() == [2, 4, 5] and kept[1].tolist() == [False, True, True, True]


def test_select_rows_never_forces_padding_inside_the_window():
    scores = torch.tensor([[float("-inf"), float("-inf"), 0.5, 0.1]])
    index, kept = select_rows(scores, torch.tensor([2]), window=3)
    assert index.tolist() == [[2, 3]] and kept.all()


def test_prune_scores_sum_rows_and_heads():
    probs = torch.rand(2, 3, 10, 7)
    summed = probs[:, :, -8:].sum((1, 2))
    torch.testing.assert_close(prune_scores(probs, rows=8, kernel=1), summed)  # the official score
    pooled = torch.nn.functional.max_pool1d(summed[:, None], 3, stride=1, padding=1)[:, 0]
    torch.testing.assert_close(prune_scores(probs, rows=8, kernel=3, pooling="max"), pooled)


def test_snapkv_scores_mask_invalid_keys_and_match_window_scores():
    torch.manual_seed(1)
    query, keys = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 12, 8)
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, :3] = False
    probs = window_attention(query[:, :, -6:], keys, valid, 0.3)
    scores = snapkv_scores(probs, valid, 2, window=4, kernel=3)
    assert scores.shape == (1, 2, 12)
    assert bool(torch.isinf(scores[0, :, :3]).all()) and bool(torch.isfinite(scores[0, :, 3:]).all())
    last_four = window_attention(query[:, :, -4:], keys, valid, 0.3)  # only the rows the window uses
    torch.testing.assert_close(scores, snapkv_scores(last_four, valid, 2, window=4, kernel=3))


@pytest.mark.parametrize("spec,prompt_len,window,expected", [
    ("5%", 1000, 32, 50), ("5%", 999, 32, 50), ("100%", 300, 32, 300), (128, 1000, 32, 128),
    ("128", 1000, 32, 128), (" 64 ", 1000, 32, 64), (5000, 1000, 32, 1000), ("10%", 20, 2, 2),
    ("1%", 1000, 32, 1000), ("10%", 37, 32, 37), ("10%", 20, 32, 20),  # a share under the window: all
])
def test_resolve_budget(spec, prompt_len, window, expected):
    assert resolve_budget(spec, prompt_len, window) == expected


@pytest.mark.parametrize("spec,message", [
    (0, "at least 1 token"), ("0", "at least 1 token"), (-5, "at least 1 token"), ("0%", "more than 0%"),
    ("-3%", "more than 0%"), ("150%", "at most 100%"), ("0.05", "ambiguous"), (0.05, "ambiguous"),
    ("lots", "not a token count"), ("nan%", "more than 0%"), ("10", "below the 32-token observation window"),
])
def test_resolve_budget_errors_are_clear(spec, message):
    with pytest.raises(UncompError, match=message):
        resolve_budget(spec, 1000, window=32)


def test_budget_under_the_window_is_fine_when_it_keeps_the_whole_prompt():
    assert resolve_budget(16, 16, window=32) == 16


@pytest.mark.parametrize("kwargs,message", [
    ({"kernel": 4}, "odd"), ({"kernel": 0}, "odd"), ({"window": 0}, "window"),
    ({"pooling": "min"}, "pooling"), ({"aggregate": "sum"}, "aggregate"),
])
def test_scorer_settings_are_validated(kwargs, message):
    with pytest.raises(UncompError, match=message):
        SnapKVScorer(**kwargs)


def test_the_pruning_score_can_rank_by_the_one_head_that_looks():
    """heads="max": a token one head attends to sharply outranks one every head attends to mildly."""
    from uncomp_cli.engine.selection import prune_scores

    probs = torch.zeros(1, 4, 2, 10)  # [B, H_q, rows, N]
    probs[:, :, :, 3] = 0.2  # every head, mildly
    probs[:, 1, :, 7] = 0.5  # one head, sharply
    by_sum = prune_scores(probs, rows=2, kernel=1, pooling="max")
    by_max = prune_scores(probs, rows=2, kernel=1, pooling="max", heads="max")
    assert int(by_sum.argmax()) == 3 and int(by_max.argmax()) == 7
    torch.testing.assert_close(by_sum, probs.sum(dim=(1, 2)))
