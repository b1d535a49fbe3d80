"""UNComp (arXiv 2410.03090): entropy-guided budgets per KV head and per-layer prefill pruning.

The profile (calibrated offline) decides the numbers; this policy applies them to one prompt:
``kv_head_budgets[l, h]`` tokens kept by KV head ``h`` of layer ``l`` after prefill (KV heads of a
layer with equal budgets share one dense tensor), and ``layer_keep[l]`` the share of the prompt
that layer ``l`` runs on during prefill (hidden-state pruning; None = off). Which tokens survive is
decided online from attention scores, SnapKV-style.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from uncomp_cli.defaults import FIRST_PRUNED_LAYER_FRACTION, OFFICIAL_PRUNE_MIN_SHARE, OFFICIAL_PRUNE_STEP_SHARE
from uncomp_cli.engine.attention import check_supported
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.plan import CachePlan, LayerPlan, PruneSchedule
from uncomp_cli.engine.prefill import parse_keep_fractions, spans_keep, validate_layer_keep
from uncomp_cli.engine.selection import PRUNE_HEADS, PRUNE_LAYERS, resolve_budget
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
    window: int = options.option_field("window")
    kernel: int = options.option_field("kernel")
    pooling: str = options.option_field("pooling")
    aggregate: str = options.option_field("aggregate")
    decode_evict: bool = options.option_field("decode_evict")
    profile: Profile | None = None
    budget: int | str = options.option_field("budget")
    prefill_compression: bool = options.option_field("prefill_compression")
    prefill_keep: Sequence[float] | str | None = options.option_field("prefill_keep")
    prefill_schedule: str = options.option_field("prefill_schedule")
    prefill_max_len: int = options.option_field("prefill_max_len")
    prefill_from: int | None = options.option_field("prefill_from")
    prune_heads: str = options.option_field("prune_heads")
    prune_layers: str = options.option_field("prune_layers")
    prune_contexts: bool = options.option_field("prune_contexts")
    preset: str | None = options.option_field("preset")
    uniform_heads: bool = False

    def validate(self) -> None:
        if self.prefill_keep is not None:
            self.prefill_keep = parse_keep_fractions(self.prefill_keep)
        if self.prefill_schedule not in ("fraction", "official"):
            raise UncompError(f"--prefill-schedule must be fraction or official, got {self.prefill_schedule!r}")
        if self.prefill_schedule == "official" and self.prefill_keep is not None:
            raise UncompError("--prefill-keep sets fractions; it does not go with --prefill-schedule official")
        if self.prune_heads not in PRUNE_HEADS:
            raise UncompError(f"--prune-heads must be one of {', '.join(PRUNE_HEADS)}, got {self.prune_heads!r}")
        if self.prune_layers not in PRUNE_LAYERS:
            raise UncompError(f"--prune-layers must be one of {', '.join(PRUNE_LAYERS)}, got {self.prune_layers!r}")
        if self.prefill_max_len < 1:
            raise UncompError(f"--prefill-max-len must be at least 1, got {self.prefill_max_len}")
        if self.prefill_from is not None and self.prefill_from < 1:
            raise UncompError(f"--prefill-from must be at least 1 (layer 0 is never pruned), got {self.prefill_from}")
        if self.kv_head_budgets is not None:
            if self.profile is not None:
                raise UncompError("give UNCompPolicy either a profile and a budget, or kv_head_budgets")
            self.kv_head_budgets = _checked_budgets(self.kv_head_budgets)

    def check_budget(self) -> None:
        if self.kv_head_budgets is None:  # a resolved [L, H_kv] table needs no budget
            super().check_budget()

    def kv_budget(self, prompt_len: int) -> int:
        """The average tokens per KV head; the profile spreads it and each head is clipped to its layer."""
        return resolve_budget(self.parsed_budget, prompt_len, self.min_budget(), clip=False)

    def resolve(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        """Budgets int64 [L, H_kv] for this batch of prompts, and the pruning schedule (None: no
        pruning): ``{"layer_keep": shares}`` or ``{"layer_tokens": counts}``; :meth:`plan` wraps both."""
        config = model.config
        check_supported(config)
        if self.kv_head_budgets is not None:
            budgets = self.kv_head_budgets
            schedule = None if self.layer_keep is None else {"layer_keep": list(self.layer_keep)}
        elif self.profile is None:
            raise UncompError("the uncomp method needs a profile and a budget (or kv_head_budgets)")
        else:
            self.profile.check_model(config)
            prompt_len = prompt_length(attention_mask)
            if self.parsed_budget.too_small(prompt_len, self.min_budget()):  # nothing worth compressing
                return torch.full((config.num_hidden_layers, config.num_key_value_heads), prompt_len), None
            schedule, reach = self._schedule(config.num_hidden_layers, prompt_len)
            profile = self.profile
            if self.uniform_heads:
                profile = profile.replace(group_budget_share=torch.ones_like(profile.group_budget_share))
            budgets = _checked_budgets(profile.kv_head_budgets(self.kv_budget(prompt_len), reach))
        expected = (config.num_hidden_layers, config.num_key_value_heads)
        if tuple(budgets.shape) != expected:
            raise UncompError(f"kv_head_budgets is shaped {tuple(budgets.shape)} but the model has "
                              f"{expected[0]} layers × {expected[1]} KV heads")
        if schedule is not None and "layer_keep" in schedule:
            validate_layer_keep(schedule["layer_keep"], config.num_hidden_layers)
        return budgets, schedule

    def _schedule(self, num_layers: int, prompt_len: int) -> tuple[dict | None, int | torch.Tensor]:
        """The pruning schedule from the profile's stages, and the tokens reaching each layer."""
        if not self.prefill_compression:
            return None, prompt_len
        first_pruned = self.prefill_from if self.prefill_from is not None else \
            max(1, math.ceil(FIRST_PRUNED_LAYER_FRACTION * num_layers))
        if first_pruned >= num_layers:
            raise UncompError(f"--prefill-from {first_pruned} leaves nothing to prune in a {num_layers}-layer model")
        if self.prefill_schedule == "official":
            tokens = official_layer_tokens(self.profile.layer_stage, first_pruned, self.prefill_max_len)
            reach = torch.tensor([min(prompt_len, t) for t in tokens])
            return (None, prompt_len) if int(reach.min()) >= prompt_len else ({"layer_tokens": tokens}, reach)
        keep = self.profile.layer_keep_fraction().clone()
        keep[:first_pruned] = 1.0
        if self.prefill_keep is not None:
            keep = torch.tensor(spans_keep(len(keep), first_pruned, self.prefill_keep))
        reach = torch.ceil(keep.double() * prompt_len).long()
        return (None, prompt_len) if float(keep.min()) >= 1 else ({"layer_keep": [float(f) for f in keep]}, reach)

    def plan(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> CachePlan:
        budgets, schedule = self.resolve(model, attention_mask)
        stats: dict = {"kv_budget_tokens_mean": round(float(budgets.float().mean()), 2)}
        if self.profile is not None:
            prompt_len = prompt_length(attention_mask)
            stats |= {"kv_budget_tokens": self.kv_budget(prompt_len), "layer_stage": self.profile.layer_stage.tolist()}
            stats |= budget_note(self.parsed_budget, prompt_len, self.min_budget())
        prune = None if schedule is None else PruneSchedule(
            layer_keep=None if "layer_keep" not in schedule else tuple(schedule["layer_keep"]),
            layer_tokens=None if "layer_tokens" not in schedule else tuple(schedule["layer_tokens"]),
            heads=self.prune_heads, layers=self.prune_layers)
        layers = [LayerPlan(tuple(row), self.scorer, self.decode_evict) for row in budgets.tolist()]
        return CachePlan.build(layers, prune, stats)

    def stats(self, cache: GroupedKVCache) -> dict:
        return dict(cache.stats) | {"prefill_tokens_per_layer": cache.prefill_tokens_per_layer()}

    def for_context(self) -> UNCompPolicy:
        """Without ``prune_contexts``, a context is compressed without hidden-state pruning (the
        entropy head budgets stay): pruning is decided by the window at the end of the prompt, and
        without the question there it keeps what the context's last sentences look at."""
        if self.prune_contexts or (not self.prefill_compression and self.layer_keep is None):  # nothing to turn off
            return self
        return self.given(prefill_compression=False, layer_keep=None)

    def reading_key(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Hashable | None:
        """Unpruned: the whole context, as every method; pruned: the schedule and the scorer that
        decides what the pruned layers run on (budgets do not enter)."""
        if self.decode_evict:
            return None
        prune = self.plan(model, attention_mask).prune
        return "whole" if prune is None else ("pruned", json.dumps(prune.describe(), sort_keys=True), self.scorer)

    def describe(self) -> dict:
        described = super().describe()
        if self.kv_head_budgets is not None:
            for name in ("budget", "prefill_compression", "prefill_keep", "prefill_schedule", "prefill_max_len",
                         "prefill_from", "preset"):
                described.pop(name, None)
            return described | {"layer_keep": None if self.layer_keep is None else [float(f) for f in self.layer_keep]}
        return described | {"uniform_heads": self.uniform_heads,
                            "stages": None if self.profile is None else self.profile.num_stages}


#: A layer before the first pruned one runs on every token, however long the prompt.
UNLIMITED = 1 << 40


def official_layer_tokens(layer_stage: torch.Tensor, first_pruned: int, max_len: int) -> list[int]:
    """The official code's absolute schedule: a layer in stage s of S (the last stage) runs on at most
    ``m + a·(S − s)`` tokens, m and a the official 1536 and 640 scaled to ``max_len`` from 4096;
    layers before ``first_pruned`` are not pruned. One stage: nothing is pruned."""
    last = int(layer_stage.max())
    counts = []
    for layer, stage in enumerate(layer_stage.tolist()):  # stages never fall, so counts never rise
        share = OFFICIAL_PRUNE_MIN_SHARE + OFFICIAL_PRUNE_STEP_SHARE * (last - stage)
        counts.append(UNLIMITED if layer < first_pruned or last == 0 else max(1, round(max_len * share)))
    return counts


def _checked_budgets(budgets) -> torch.Tensor:
    budgets = torch.as_tensor(budgets)
    if budgets.dim() != 2 or budgets.is_floating_point() or budgets.is_complex():
        raise UncompError(f"kv_head_budgets must be integer tokens shaped [layers, kv_heads], got "
                          f"{budgets.dtype} {tuple(budgets.shape)}")
    if bool((budgets < 1).any()):
        raise UncompError(f"every KV head needs a budget of at least 1 token, got {int(budgets.min())}")
    return budgets.long()
