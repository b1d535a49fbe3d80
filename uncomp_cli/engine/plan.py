"""What a grouped cache will do for one batch of prompts, decided before it runs.

A policy resolves once per prompt (or batch) into a :class:`CachePlan`: per layer the tokens each
KV head keeps, the scorer that chooses them, whether decoding evicts, whether the selection waits
for a later pass (a context scored by its re-reading), and the hidden-state pruning schedule with
the layers whose attention decides it. The cache and the pruner are built from the plan and never
change each other's settings afterwards; what a run leaves in a layer (its counters, its groups)
is read and written through the layer's public methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from uncomp_cli.engine.selection import PRUNE_LAYERS, PRUNE_WINDOW, SnapKVScorer
from uncomp_cli.errors import UncompError


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer's cache.

    ``budgets[h]``: tokens KV head ``h`` keeps after prefill (None = all). ``allocator``: turns the
    prefill scores [B, H_kv, N] into tokens per row and KV head, int64 [B, H_kv], for budgets known
    only then (AdaKV). ``defer_selection``: keep every prompt token until
    :meth:`~uncomp_cli.engine.cache.GroupedKVLayer.select` is called. ``prune_heads``: keep the
    prefill's pruning score for the next layer, its query heads combined this way (None: this
    layer decides no pruning point).
    """

    budgets: tuple[int | None, ...]
    scorer: SnapKVScorer = field(default_factory=SnapKVScorer)
    decode_evict: bool = False
    allocator: Callable[[torch.Tensor], torch.Tensor] | None = None
    defer_selection: bool = False
    prune_heads: str | None = None

    def __post_init__(self) -> None:
        for head, budget in enumerate(self.budgets):
            if budget is not None and budget < 1:
                raise UncompError(f"KV head {head} has a budget of {budget} tokens; it must be at least 1")


@dataclass(frozen=True)
class PruneSchedule:
    """Hidden-state pruning at prefill: each layer runs on ``layer_keep[l]`` of each row's prompt
    (shares) or at most ``layer_tokens[l]`` tokens (counts), exactly one of the two. ``heads``:
    how a pruning score combines query heads (``sum`` or ``max``); ``layers``: whether the layer
    before a pruning point decides it (``last``) or every layer since the previous point (``span``)."""

    layer_keep: tuple[float, ...] | None = None
    layer_tokens: tuple[int, ...] | None = None
    heads: str = "sum"
    layers: str = "last"
    window: int = PRUNE_WINDOW

    def __post_init__(self) -> None:
        if (self.layer_keep is None) == (self.layer_tokens is None):
            raise UncompError("a pruning schedule takes either layer_keep (shares) or layer_tokens (counts)")
        if self.layers not in PRUNE_LAYERS:
            raise UncompError(f"--prune-layers must be one of {', '.join(PRUNE_LAYERS)}, got {self.layers!r}")

    @property
    def limits(self) -> tuple[float, ...] | tuple[int, ...]:
        return self.layer_keep if self.layer_keep is not None else self.layer_tokens

    def points(self) -> set[int]:
        """The layers that run on fewer tokens than the one before them."""
        limits = self.limits
        return {i for i in range(1, len(limits)) if limits[i] < limits[i - 1]}

    def scoring_layers(self) -> set[int]:
        """The layers whose prefill attention decides a pruning point."""
        points = self.points()
        return set(range(max(points, default=0))) if self.layers == "span" else {i - 1 for i in points}

    def describe(self) -> dict:
        """JSON-ready: what decides pruning (keys of a shared re-reading, reports)."""
        schedule = {"layer_keep": list(self.layer_keep)} if self.layer_keep is not None \
            else {"layer_tokens": list(self.layer_tokens)}
        return schedule | {"heads": self.heads, "layers": self.layers}


@dataclass(frozen=True)
class CachePlan:
    """A grouped cache's layers, bottom first, and its pruning schedule (None: no pruning).
    ``stats``: what the policy resolved (budgets in tokens, notes), reported with the run."""

    layers: tuple[LayerPlan, ...]
    prune: PruneSchedule | None = None
    stats: dict = field(default_factory=dict, compare=False)

    @classmethod
    def build(cls, layers: Sequence[LayerPlan], prune: PruneSchedule | None = None,
              stats: dict | None = None) -> CachePlan:
        """The plan, with the layers that decide a pruning point told to keep their scores."""
        layers = list(layers)
        if prune is not None:
            if len(prune.limits) != len(layers):
                raise UncompError(f"the pruning schedule has {len(prune.limits)} layers, the cache {len(layers)}")
            for index in prune.scoring_layers():
                layers[index] = dataclasses.replace(layers[index], prune_heads=prune.heads)
        return cls(tuple(layers), prune, dict(stats or {}))

    @classmethod
    def uniform(cls, kv_head_budgets: Sequence[Sequence[int | None]] | torch.Tensor,
                scorer: SnapKVScorer | None = None, decode_evict: bool = False,
                stats: dict | None = None) -> CachePlan:
        """``kv_head_budgets``: [L, H_kv] tokens per KV head (None = keep all), one scorer for all."""
        rows = kv_head_budgets.tolist() if isinstance(kv_head_budgets, torch.Tensor) else kv_head_budgets
        scorer = scorer or SnapKVScorer()
        return cls.build([LayerPlan(tuple(row), scorer, decode_evict) for row in rows], stats=stats)

    @classmethod
    def keep_all(cls, num_layers: int, num_kv_heads: int) -> CachePlan:
        """Every layer keeps every token: the full cache as a grouped one (rows of different methods
        decoding together, :mod:`uncomp_cli.engine.ragged`)."""
        return cls.uniform([[None] * num_kv_heads] * num_layers)

    def without_pruning(self) -> CachePlan:
        """The same budgets and scorers, no hidden-state pruning (a prompt fed in chunks)."""
        layers = [dataclasses.replace(layer, prune_heads=None) for layer in self.layers]
        return dataclasses.replace(self, layers=tuple(layers), prune=None)

    def deferred(self) -> CachePlan:
        """The same plan with every layer keeping the whole prompt until told what to select."""
        return dataclasses.replace(self, layers=tuple(dataclasses.replace(layer, defer_selection=True)
                                                     for layer in self.layers))

    def budget_table(self) -> list[list[int | None]]:
        """[L][H_kv] tokens per KV head."""
        return [list(layer.budgets) for layer in self.layers]
