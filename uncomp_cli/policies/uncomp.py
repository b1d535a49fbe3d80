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
from dataclasses import dataclass
from typing import ClassVar

import torch

from uncomp_cli.defaults import FIRST_PRUNED_LAYER_FRACTION
from uncomp_cli.engine.attention import check_supported, use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.prefill import HiddenStatePruner, parse_keep_fractions, spans_keep, validate_layer_keep
from uncomp_cli.engine.selection import Budget, resolve_budget
from uncomp_cli.errors import UncompError
from uncomp_cli.policies import options
from uncomp_cli.policies.base import GroupedCachePolicy, budget_note, prompt_length
from uncomp_cli.profile.file import Profile


@dataclass(eq=False)  # a tensor field: compare policies by identity
class UNCompPolicy(GroupedCachePolicy):
    """Per-KV-head budgets and per-layer prefill keep fractions, from a profile or given directly.

    With ``profile`` and ``budget`` (the usual way), for each batch of prompts: ``budget`` (``"5%"``
    of the prompt — of the longest row in a batch — or ``128`` tokens) is the average per KV head,
    spread over the heads by the profile's group shares (``uniform_heads``: every head gets the
    average, an ablation); layers keep the profile's stage fractions of the prompt during prefill
    unless ``prefill_compression`` is off, never before a quarter of the layers
    (``FIRST_PRUNED_LAYER_FRACTION``: early layers attend by position, not by content); every
    budget is clipped to the tokens that reach its layer. A share too small for a short prompt
    (under the window) keeps the whole prompt in every head and prunes nothing. The registry brings the profile
    (``needs_profile``); a policy without one can still be built and checked, not run.

    Directly: ``kv_head_budgets`` int64 [L, H_kv] in tokens and ``layer_keep`` (one fraction per
    layer, 1.0 for layer 0, never rising; None = no pruning), already resolved for the prompt.

    With pruning, the prefill forward returns logits only for the tokens that reached the last
    layer; the last one is still the last prompt token, so ``logits_to_keep=1`` is unchanged.
    ``decode_evict``: keep each head group at its budget while decoding (the official code's
    behaviour) instead of appending new tokens. ``prefill_keep`` (e.g. ``"0.75,0.5,0.35"``) replaces
    the profile's stage fractions by equal spans of the prunable layers (:func:`spans_keep`): for
    models whose entropy barely falls with depth, where calibrated stages prune little.
    """

    name: ClassVar[str] = "uncomp"
    needs_profile: ClassVar[bool] = True

    kv_head_budgets: torch.Tensor | None = None
    layer_keep: Sequence[float] | None = None
    window: int = options.WINDOW.field()
    kernel: int = options.KERNEL.field()
    pooling: str = options.POOLING.field()
    aggregate: str = options.AGGREGATE.field()
    decode_evict: bool = options.DECODE_EVICT.field()
    profile: Profile | None = None
    budget: int | str = options.BUDGET.field()
    prefill_compression: bool = options.PREFILL_COMPRESSION.field()
    prefill_keep: Sequence[float] | str | None = options.PREFILL_KEEP.field()
    uniform_heads: bool = False

    def validate(self) -> None:
        if self.prefill_keep is not None:
            self.prefill_keep = parse_keep_fractions(self.prefill_keep)
        if self.kv_head_budgets is not None:
            if self.profile is not None:
                raise UncompError("give UNCompPolicy either a profile and a budget, or kv_head_budgets")
            self.kv_head_budgets = _checked_budgets(self.kv_head_budgets)

    def check_budget(self) -> None:
        if self.kv_head_budgets is None:  # a resolved [L, H_kv] table needs no budget
            super().check_budget()

    def kv_budget(self, prompt_len: int) -> int:
        """The average tokens per KV head; the profile spreads it and each head is clipped to its layer."""
        return resolve_budget(self.budget, prompt_len, self.min_budget(), clip=False)

    def resolve(self, model: torch.nn.Module, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, list[float] | None]:
        """Budgets int64 [L, H_kv] and layer keep fractions (or None) for this batch of prompts."""
        config = model.config
        check_supported(config)
        if self.kv_head_budgets is not None:
            budgets, layer_keep = self.kv_head_budgets, self.layer_keep
        elif self.profile is None:
            raise UncompError("the uncomp method needs a profile and a budget (or kv_head_budgets)")
        else:
            self.profile.check_model(config)
            prompt_len = prompt_length(attention_mask)
            if Budget.parse(self.budget).too_small(prompt_len, self.min_budget()):  # nothing worth compressing
                return torch.full((config.num_hidden_layers, config.num_key_value_heads), prompt_len), None
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
            budgets = _checked_budgets(profile.kv_head_budgets(self.kv_budget(prompt_len), reach))
            layer_keep = None if keep is None or float(keep.min()) >= 1 else [float(f) for f in keep]
        expected = (config.num_hidden_layers, config.num_key_value_heads)
        if tuple(budgets.shape) != expected:
            raise UncompError(f"kv_head_budgets is shaped {tuple(budgets.shape)} but the model has "
                              f"{expected[0]} layers × {expected[1]} KV heads")
        if layer_keep is not None:
            validate_layer_keep(layer_keep, config.num_hidden_layers)
        return budgets, layer_keep

    def _cache(self, budgets: torch.Tensor, attention_mask: torch.Tensor) -> GroupedKVCache:
        stats: dict = {"kv_budget_tokens_mean": round(float(budgets.float().mean()), 2)}
        if self.profile is not None:
            prompt_len = prompt_length(attention_mask)
            stats |= {"kv_budget_tokens": self.kv_budget(prompt_len), "layer_stage": self.profile.layer_stage.tolist()}
            stats |= budget_note(self.budget, prompt_len, self.min_budget())
        return GroupedKVCache.from_budgets(budgets, self.scorer, self.decode_evict, stats)

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> GroupedKVCache:
        budgets, _ = self.resolve(model, attention_mask)
        return self._cache(budgets, attention_mask)

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Iterator[GroupedKVCache]:
        """Grouped attention over a fresh cache, plus hidden-state pruning when layers keep < 1."""
        budgets, layer_keep = self.resolve(model, attention_mask)
        cache = self._cache(budgets, attention_mask)
        with contextlib.ExitStack() as stack:
            stack.enter_context(use_grouped_cache(model, cache))
            if layer_keep is not None:
                stack.enter_context(HiddenStatePruner(model, cache, layer_keep))
            yield cache

    def stats(self, cache: GroupedKVCache) -> dict:
        return dict(cache.stats) | {"prefill_tokens_per_layer": cache.prefill_tokens_per_layer()}

    def describe(self) -> dict:
        described = super().describe()
        if self.kv_head_budgets is not None:
            for name in ("budget", "prefill_compression", "prefill_keep"):
                described.pop(name, None)
            return described | {"layer_keep": None if self.layer_keep is None else [float(f) for f in self.layer_keep]}
        return described | {"uniform_heads": self.uniform_heads,
                            "stages": None if self.profile is None else self.profile.num_stages}


def _checked_budgets(budgets) -> torch.Tensor:
    budgets = torch.as_tensor(budgets)
    if budgets.dim() != 2 or budgets.is_floating_point() or budgets.is_complex():
        raise UncompError(f"kv_head_budgets must be integer tokens shaped [layers, kv_heads], got "
                          f"{budgets.dtype} {tuple(budgets.shape)}")
    if bool((budgets < 1).any()):
        raise UncompError(f"every KV head needs a budget of at least 1 token, got {int(budgets.min())}")
    return budgets.long()
