"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV selection with budgets that shrink with depth.

Lower layers attend broadly and keep more; upper layers attend to few tokens and keep less. The
per-layer budgets fall arithmetically from the bottom layer to the top and average the requested
budget, as in the official code (KVCache-Factory ``PyramidKVCluster``): beyond the ``window``,
the top layer keeps ``1/beta`` of the average share and the bottom layer twice the average minus
that; when the bottom layer would need more than the prompt, it keeps the whole prompt and the
top layer takes up the difference. Every KV head of a layer shares its layer's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from uncomp_cli.engine.cache import GroupedKVCache, check_supported
from uncomp_cli.defaults import (
    DEFAULT_AGGREGATE,
    DEFAULT_BUDGET,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_PYRAMID_BETA,
    DEFAULT_WINDOW,
)
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.base import GroupedCachePolicy
from uncomp_cli.engine.selection import SnapKVScorer, resolve_budget


def pyramid_budgets(budget: int, prompt_len: int, window: int, num_layers: int,
                    beta: float = DEFAULT_PYRAMID_BETA) -> list[int]:
    """Tokens kept per layer, bottom first: non-increasing, averaging ``budget`` exactly (in whole
    tokens: the remainder goes to the layers the linear schedule rounds up most), each between
    ``min(window, prompt_len)`` and ``prompt_len``. ``budget`` is already resolved and clipped."""
    if budget >= prompt_len:
        return [prompt_len] * num_layers
    window = min(window, prompt_len)
    share = budget - window  # the selected part, beyond the always-kept window
    if num_layers == 1 or share == 0:
        return [budget] * num_layers
    top = share / Fraction(beta)  # exact arithmetic: the rounding below must see true fractions
    bottom = 2 * share - top
    if bottom > prompt_len - window:  # the bottom layer cannot keep more than the prompt
        bottom = prompt_len - window
        top = 2 * share - bottom
    exact = [bottom - (bottom - top) * layer / (num_layers - 1) for layer in range(num_layers)]
    kept = [math.floor(value) for value in exact]
    remainder = share * num_layers - sum(kept)
    # Largest fractional parts first, earlier layers on ties: keeps the schedule non-increasing.
    for layer in sorted(range(num_layers), key=lambda i: (kept[i] - exact[i], i))[:remainder]:
        kept[layer] += 1
    return [window + value for value in kept]


@dataclass
class PyramidKVPolicy(GroupedCachePolicy):
    """``budget``: the average tokens per KV head over layers (``128`` or ``"5%"`` of the longest
    prompt); ``beta``: how steep the pyramid is (1 = flat, SnapKV). Selection as SnapKV's."""

    budget: int | str = DEFAULT_BUDGET
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING
    aggregate: str = DEFAULT_AGGREGATE
    decode_evict: bool = False
    beta: float = DEFAULT_PYRAMID_BETA
    name: str = "pyramidkv"
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scorer = SnapKVScorer(self.window, self.kernel, self.pooling, self.aggregate)  # validates
        if not self.beta >= 1:  # also refuses nan
            raise UncompError(f"--beta must be at least 1 (1 = the same budget in every layer), got {self.beta}")

    def layer_budgets(self, num_layers: int, prompt_len: int) -> list[int]:
        """Tokens per KV head for each layer, bottom first, for a prompt of ``prompt_len``."""
        budget = resolve_budget(self.budget, prompt_len, self.window)
        return pyramid_budgets(budget, prompt_len, self.window, num_layers, self.beta)

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> GroupedKVCache:
        check_supported(model.config)
        config = model.config
        budgets = self.layer_budgets(config.num_hidden_layers, int(attention_mask.sum(-1).max()))
        self.last_stats = {"kv_budget_tokens_mean": round(sum(budgets) / len(budgets), 2),
                           "kv_budget_tokens_per_layer": budgets}
        rows = [[budget] * config.num_key_value_heads for budget in budgets]
        return GroupedKVCache.from_budgets(rows, self.scorer, self.decode_evict)

    def describe(self) -> dict:
        return {"method": self.name, "budget": self.budget, "beta": self.beta, "window": self.window,
                "kernel": self.kernel, "pooling": self.pooling, "aggregate": self.aggregate,
                "decode_evict": self.decode_evict}
