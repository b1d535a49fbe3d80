"""UNComp (arXiv 2410.03090): entropy-guided budgets per KV head and per-layer prefill pruning.

The profile (calibrated offline) decides the numbers; this policy applies them to one prompt:
``kv_head_budgets[l, h]`` tokens kept by KV head ``h`` of layer ``l`` after prefill (KV heads of a
layer with equal budgets share one dense tensor), and ``layer_keep[l]`` the share of the prompt
that layer ``l`` runs on during prefill (hidden-state pruning; None = off). Which tokens survive is
decided online from attention scores, SnapKV-style.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from uncomp_cli.cache import GroupedKVCache, use_grouped_cache
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.prefill import HiddenStatePruner, validate_layer_keep
from uncomp_cli.selection import (
    DEFAULT_AGGREGATE,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_WINDOW,
    SnapKVScorer,
)


@dataclass(eq=False)  # a tensor field: compare policies by identity
class UNCompPolicy(CachePolicy):
    """``kv_head_budgets``: int64 [L, H_kv], tokens already resolved for this prompt length.

    ``layer_keep``: one fraction per layer, 1.0 for layer 0, never rising. With it, the prefill
    forward returns logits only for the tokens that reached the last layer; the last one is still
    the last prompt token, so ``logits_to_keep=1`` (what the generation loop asks) is unchanged.
    ``decode_evict``: keep each head group at its budget while decoding (the official code's
    behaviour) instead of appending new tokens.
    """

    kv_head_budgets: torch.Tensor
    layer_keep: Sequence[float] | None = None
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING
    aggregate: str = DEFAULT_AGGREGATE
    decode_evict: bool = False
    name: str = "uncomp"
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scorer = SnapKVScorer(self.window, self.kernel, self.pooling, self.aggregate)  # validates
        budgets = torch.as_tensor(self.kv_head_budgets)
        if budgets.dim() != 2 or budgets.is_floating_point() or budgets.is_complex():
            raise UncompError(f"kv_head_budgets must be integer tokens shaped [layers, kv_heads], got "
                              f"{budgets.dtype} {tuple(budgets.shape)}")
        if bool((budgets < 1).any()):
            raise UncompError(f"every KV head needs a budget of at least 1 token, got {int(budgets.min())}")
        self.kv_head_budgets = budgets.long()

    def _check_model(self, model: torch.nn.Module) -> None:
        config = model.config
        expected = (config.num_hidden_layers, config.num_key_value_heads)
        if tuple(self.kv_head_budgets.shape) != expected:
            shape = tuple(self.kv_head_budgets.shape)
            raise UncompError(f"kv_head_budgets is shaped {shape} but the model has "
                              f"{expected[0]} layers × {expected[1]} KV heads")
        if self.layer_keep is not None:
            validate_layer_keep(self.layer_keep, config.num_hidden_layers)

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> GroupedKVCache:
        self._check_model(model)
        return GroupedKVCache.from_budgets(self.kv_head_budgets, self.scorer, self.decode_evict)

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Iterator[GroupedKVCache]:
        """Grouped attention over a fresh cache, plus hidden-state pruning when ``layer_keep`` is set.
        ``last_stats`` fills in during prefill (``prefill_tokens_per_layer``)."""
        cache = self.make_cache(model, attention_mask)
        self.last_stats = {"kv_budget_tokens_mean": float(self.kv_head_budgets.float().mean())}
        with contextlib.ExitStack() as stack:
            stack.enter_context(use_grouped_cache(model, cache))
            if self.layer_keep is not None:
                pruner = stack.enter_context(HiddenStatePruner(model, cache, self.layer_keep))
                pruner.stats = self.last_stats  # filled in place at prefill
            yield cache

    def describe(self) -> dict:
        return {"method": self.name,
                "kv_budget_tokens_mean": float(self.kv_head_budgets.float().mean()),
                "layer_keep": None if self.layer_keep is None else [float(f) for f in self.layer_keep],
                "window": self.window, "kernel": self.kernel, "pooling": self.pooling,
                "aggregate": self.aggregate, "decode_evict": self.decode_evict}
