"""SnapKV (Li et al., arXiv 2404.14469): one budget for every KV head, chosen at the end of prefill.

Each KV head keeps the tokens the last ``window`` queries attended to most (scores pooled over
``kernel`` neighbours, query heads of a GQA group combined by ``aggregate``) plus the window
itself. Storage is per KV head and really shrinks (see :mod:`uncomp_cli.engine.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from uncomp_cli.engine.cache import GroupedKVCache, check_supported
from uncomp_cli.defaults import DEFAULT_AGGREGATE, DEFAULT_BUDGET, DEFAULT_KERNEL, DEFAULT_POOLING, DEFAULT_WINDOW
from uncomp_cli.policies.base import GroupedCachePolicy
from uncomp_cli.engine.selection import SnapKVScorer, resolve_budget


@dataclass
class SnapKVPolicy(GroupedCachePolicy):
    """``budget``: tokens per KV head (``128``) or a share of the prompt (``"5%"``, of the longest
    row in a batch); resolved with :func:`~uncomp_cli.engine.selection.resolve_budget`."""

    budget: int | str = DEFAULT_BUDGET
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING
    aggregate: str = DEFAULT_AGGREGATE
    decode_evict: bool = False
    name: str = "snapkv"
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scorer = SnapKVScorer(self.window, self.kernel, self.pooling, self.aggregate)  # validates

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> GroupedKVCache:
        check_supported(model.config)
        prompt_len = int(attention_mask.sum(-1).max())
        budget = resolve_budget(self.budget, prompt_len, self.window)
        config = model.config
        rows = [[budget] * config.num_key_value_heads] * config.num_hidden_layers
        self.last_stats = {"kv_budget_tokens": budget}
        return GroupedKVCache.from_budgets(rows, self.scorer, self.decode_evict)

    def describe(self) -> dict:
        return {"method": self.name, "budget": self.budget, "window": self.window, "kernel": self.kernel,
                "pooling": self.pooling, "aggregate": self.aggregate, "decode_evict": self.decode_evict}
