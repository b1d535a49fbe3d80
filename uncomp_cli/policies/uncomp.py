"""UNComp (arXiv 2410.03090): entropy-guided budgets per KV head and per-layer prefill pruning.

The profile (calibrated offline) decides the numbers; this policy applies them to one prompt:
``kv_head_budgets[l, h]`` tokens kept by KV head ``h`` of layer ``l`` after prefill (KV heads of a
layer with equal budgets share one dense tensor), and ``layer_keep[l]`` the share of the prompt
that layer ``l`` runs on during prefill (hidden-state pruning; None = off). Which tokens survive is
decided online from attention scores, SnapKV-style.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from uncomp_cli.engine.cache import GroupedKVCache, check_supported, use_grouped_cache
from uncomp_cli.defaults import FIRST_PRUNED_LAYER_FRACTION
from uncomp_cli.errors import UncompError
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.engine.prefill import HiddenStatePruner, parse_keep_fractions, spans_keep, validate_layer_keep
from uncomp_cli.profile.file import Profile
from uncomp_cli.engine.selection import (
    DEFAULT_AGGREGATE,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_WINDOW,
    SnapKVScorer,
    resolve_budget,
)


@dataclass(eq=False)  # a tensor field: compare policies by identity
class UNCompPolicy(CachePolicy):
    """Per-KV-head budgets and per-layer prefill keep fractions, from a profile or given directly.

    With ``profile`` and ``budget`` (the usual way), for each batch of prompts: ``budget`` (``"5%"``
    of the prompt — of the longest row in a batch — or ``128`` tokens) is the average per KV head,
    spread over the heads by the profile's group shares (``uniform_heads``: every head gets the
    average, an ablation); layers keep the profile's stage fractions of the prompt during prefill
    unless ``prefill_compression`` is off, never before a quarter of the layers
    (``FIRST_PRUNED_LAYER_FRACTION``: early layers attend by position, not by content); every
    budget is clipped to the tokens that reach its layer.

    Directly: ``kv_head_budgets`` int64 [L, H_kv] in tokens and ``layer_keep`` (one fraction per
    layer, 1.0 for layer 0, never rising; None = no pruning), already resolved for the prompt.

    With pruning, the prefill forward returns logits only for the tokens that reached the last
    layer; the last one is still the last prompt token, so ``logits_to_keep=1`` is unchanged.
    ``decode_evict``: keep each head group at its budget while decoding (the official code's
    behaviour) instead of appending new tokens. ``prefill_keep`` (e.g. ``"0.75,0.5,0.35"``) replaces
    the profile's stage fractions by equal spans of the prunable layers (:func:`spans_keep`): for
    models whose entropy barely falls with depth, where calibrated stages prune little.
    """

    kv_head_budgets: torch.Tensor | None = None
    layer_keep: Sequence[float] | None = None
    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING
    aggregate: str = DEFAULT_AGGREGATE
    decode_evict: bool = False
    profile: Profile | None = None
    budget: int | str | None = None
    prefill_compression: bool = True
    prefill_keep: Sequence[float] | str | None = None
    uniform_heads: bool = False
    name: str = "uncomp"
    last_stats: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.scorer = SnapKVScorer(self.window, self.kernel, self.pooling, self.aggregate)  # validates
        if self.prefill_keep is not None:
            self.prefill_keep = parse_keep_fractions(self.prefill_keep)
        if self.profile is not None:
            if self.budget is None or self.kv_head_budgets is not None:
                raise UncompError("give UNCompPolicy either a profile and a budget, or kv_head_budgets")
        elif self.kv_head_budgets is None:
            raise UncompError("the uncomp method needs a profile and a budget (or kv_head_budgets)")
        else:
            self.kv_head_budgets = _checked_budgets(self.kv_head_budgets)

    def resolve(self, model: torch.nn.Module, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, list[float] | None]:
        """Budgets int64 [L, H_kv] and layer keep fractions (or None) for this batch of prompts."""
        config = model.config
        check_supported(config)
        if self.profile is None:
            budgets, layer_keep = self.kv_head_budgets, self.layer_keep
        else:
            self.profile.check_model(config)
            prompt_len = int(attention_mask.sum(-1).max())
            average = resolve_budget(self.budget, prompt_len, self.window, clip=False)  # clipped per head
            keep = self.profile.layer_keep_fraction().clone() if self.prefill_compression else None
            if keep is not None:
                first_pruned = max(1, math.ceil(FIRST_PRUNED_LAYER_FRACTION * len(keep)))
                keep[:first_pruned] = 1.0
                if self.prefill_keep is not None:
                    keep = torch.tensor(spans_keep(len(keep), first_pruned, self.prefill_keep))
            reach = prompt_len if keep is None else torch.ceil(keep.double() * prompt_len).long()
            profile = self.profile
            if self.uniform_heads:
                profile = profile.replace(group_budget_share=torch.ones_like(profile.group_budget_share))
            budgets = _checked_budgets(profile.kv_head_budgets(average, reach))
            layer_keep = None if keep is None or float(keep.min()) >= 1 else [float(f) for f in keep]
        expected = (config.num_hidden_layers, config.num_key_value_heads)
        if tuple(budgets.shape) != expected:
            raise UncompError(f"kv_head_budgets is shaped {tuple(budgets.shape)} but the model has "
                              f"{expected[0]} layers × {expected[1]} KV heads")
        if layer_keep is not None:
            validate_layer_keep(layer_keep, config.num_hidden_layers)
        return budgets, layer_keep

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> GroupedKVCache:
        budgets, _ = self.resolve(model, attention_mask)
        return GroupedKVCache.from_budgets(budgets, self.scorer, self.decode_evict)

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Iterator[GroupedKVCache]:
        """Grouped attention over a fresh cache, plus hidden-state pruning when layers keep < 1.
        ``last_stats`` fills in during prefill (``prefill_tokens_per_layer``)."""
        budgets, layer_keep = self.resolve(model, attention_mask)
        cache = GroupedKVCache.from_budgets(budgets, self.scorer, self.decode_evict)
        prompt_len = int(attention_mask.sum(-1).max())
        self.last_stats = {"kv_budget_tokens_mean": round(float(budgets.float().mean()), 2),
                           "prefill_tokens_per_layer": [prompt_len] * len(budgets)}  # pruning rewrites it
        if self.profile is not None:
            self.last_stats["layer_stage"] = self.profile.layer_stage.tolist()
        with contextlib.ExitStack() as stack:
            stack.enter_context(use_grouped_cache(model, cache))
            if layer_keep is not None:
                pruner = stack.enter_context(HiddenStatePruner(model, cache, layer_keep))
                pruner.stats = self.last_stats  # filled in place at prefill
            yield cache

    def describe(self) -> dict:
        described = {"method": self.name, "window": self.window, "kernel": self.kernel,
                     "pooling": self.pooling, "aggregate": self.aggregate, "decode_evict": self.decode_evict}
        if self.profile is not None:
            return described | {"budget": self.budget, "prefill_compression": self.prefill_compression,
                                 "prefill_keep": self.prefill_keep,
                                 "uniform_heads": self.uniform_heads, "stages": self.profile.num_stages}
        return described | {"layer_keep": None if self.layer_keep is None else [float(f) for f in self.layer_keep]}


def _checked_budgets(budgets) -> torch.Tensor:
    budgets = torch.as_tensor(budgets)
    if budgets.dim() != 2 or budgets.is_floating_point() or budgets.is_complex():
        raise UncompError(f"kv_head_budgets must be integer tokens shaped [layers, kv_heads], got "
                          f"{budgets.dtype} {tuple(budgets.shape)}")
    if bool((budgets < 1).any()):
        raise UncompError(f"every KV head needs a budget of at least 1 token, got {int(budgets.min())}")
    return budgets.long()
