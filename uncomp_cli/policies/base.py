"""The contract between the generation loop and a cache policy, and the mechanics most methods share.

The loop in :mod:`uncomp_cli.engine.generation` does not know what a method keeps; it asks the
policy for a cache and runs prefill and decoding inside :meth:`CachePolicy.attach`, which may
install an attention implementation or hooks for the duration and must remove them on exit. A
policy is a dataclass whose option fields (:mod:`uncomp_cli.policies.options`) are its
hyperparameters; it is never changed by a run, so one policy can serve many runs at once.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Hashable, Iterator
from typing import ClassVar

import torch
from transformers import Cache

from uncomp_cli.engine.attention import check_supported, use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.groups import buffer_tokens
from uncomp_cli.engine.plan import CachePlan, LayerPlan
from uncomp_cli.engine.prefill import HiddenStatePruner
from uncomp_cli.engine.selection import Budget, SnapKVScorer, resolve_budget


def prompt_length(attention_mask: torch.Tensor) -> int:
    """Tokens of the longest prompt of a left-padded batch: what shares of the prompt are taken of."""
    return int(attention_mask.sum(-1).max())


class CachePolicy:
    """Base policy. Subclasses are small dataclasses whose option fields are their hyperparameters."""

    #: The ``--method`` name.
    name: ClassVar[str] = "base"
    #: Whether the method takes the model's UNComp profile (the registry brings it).
    needs_profile: ClassVar[bool] = False
    #: Whether it chooses tokens by attention, so a context can be scored by a later pass instead
    #: (:mod:`uncomp_cli.contexts.compress`); False for the full cache and position rules.
    selects_by_attention: ClassVar[bool] = False

    @classmethod
    def option_names(cls, settable: bool = True) -> list[str]:
        """The method options this policy takes, in declaration order (``settable=False``: also those
        a variant fixes, such as ``uncomp-noprune``'s ``prefill_compression``)."""
        return [f.name for f in dataclasses.fields(cls) if "option" in f.metadata and (f.init or not settable)]

    def kv_budget(self, prompt_len: int) -> int | None:
        """Tokens per KV head for a prompt of ``prompt_len`` (None: keeps everything). The one budget
        check: raises :class:`~uncomp_cli.errors.UncompError` for a budget this method cannot use."""
        return None

    def held_tokens(self, tokens: int) -> int:
        """Tokens per KV head this method's cache buffers hold while ``tokens`` are stored (the
        full cache: exactly those; a grouped cache adds its decoding slack)."""
        return tokens

    def plan(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> CachePlan | None:
        """What the cache does for prompts padded to ``attention_mask`` [B, S], resolved once (None:
        the model's own cache, nothing to plan)."""
        return None

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor, plan: CachePlan | None = None
                   ) -> Cache:
        """A fresh cache for one prefill of prompts padded to ``attention_mask`` [B, S] (``plan``:
        one :meth:`plan` already resolved, e.g. deferred for a context)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor, plan: CachePlan | None = None
               ) -> Iterator[Cache]:
        """Yield a cache to prefill and decode with; undo any change to ``model`` on exit."""
        yield self.make_cache(model, attention_mask, plan)

    @contextlib.contextmanager
    def resume(self, model: torch.nn.Module, cache: Cache) -> Iterator[Cache]:
        """Run ``model`` again on a cache this policy made (a compressed context, a question after
        it): what :meth:`attach` installs for decoding, without a new cache; undone on exit."""
        yield cache

    def stats(self, cache: Cache) -> dict:
        """What this run's cache resolved and did (budgets, tokens per layer), for the results."""
        return {}

    def for_context(self) -> CachePolicy:
        """The policy that compresses a context before its question (:mod:`uncomp_cli.contexts`);
        the same one, unless a method decides something at prefill that needs the question."""
        return self

    def reading_key(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Hashable | None:
        """What a context's prefill leaves in this policy's cache when every layer keeps the whole
        context (``select_later``), as a key: policies with equal keys leave equal caches, so one
        re-reading of a context serves them all (:func:`~uncomp_cli.contexts.compress.compress_ids`
        with ``readings``). None: not shared."""
        return None

    def describe(self) -> dict:
        """Settings that identify this policy in reports (JSON-serialisable): the method and its options."""
        return {"method": self.name, **{name: getattr(self, name) for name in self.option_names(settable=False)}}

    def given(self, **fields) -> CachePolicy:
        """A copy with ``fields`` set, not checked again (a profile, or a budget already resolved):
        settings are checked once, when a policy is made from what a user wrote."""
        clone = copy.copy(self)
        for name, value in fields.items():
            if not hasattr(clone, name):
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
            setattr(clone, name, value)
        return clone


class GroupedCachePolicy(CachePolicy):
    """A policy whose cache is a :class:`~uncomp_cli.engine.cache.GroupedKVCache`.

    Subclasses have a ``budget`` and a ``decode_evict`` field; construction builds their scorer
    (:meth:`make_scorer`), parses the budget (once: :attr:`parsed_budget`) and checks every
    setting, so a bad one fails before a model loads. By default every KV head of every layer
    keeps the resolved budget; a method overrides :meth:`layer_budgets` (PyramidKV),
    :meth:`layer_plan` (AdaKV), :meth:`plan` (UNComp) or :meth:`min_budget` (StreamingLLM) for
    what it does differently.
    """

    scorer: SnapKVScorer
    parsed_budget: Budget
    selects_by_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.scorer = self.make_scorer()  # validates the selection settings
        self.validate()
        self.parsed_budget = Budget.parse(self.budget)
        self.check_budget()

    def make_scorer(self) -> SnapKVScorer:
        """How this method scores tokens at prefill (and when evicting while decoding)."""
        return SnapKVScorer(self.window, self.kernel, self.pooling, self.aggregate)

    def validate(self) -> None:
        """Refuse this method's own bad settings (the scorer checks the selection's)."""

    def min_budget(self) -> int:
        """The fewest tokens a head can keep and still select: the observation window."""
        return self.scorer.window

    def kv_budget(self, prompt_len: int) -> int:
        return resolve_budget(self.parsed_budget, prompt_len, self.min_budget())

    def check_budget(self) -> None:
        """The budget check at construction, so it fails before any model loads: a share fits every
        prompt (one too short for it is kept whole), and a token count fits every prompt if it fits
        one longer than itself."""
        if self.parsed_budget.tokens is not None:
            self.kv_budget(self.parsed_budget.tokens + 1)

    def with_budget(self, tokens: int, **fields) -> GroupedCachePolicy:
        """A copy keeping ``tokens`` per KV head (a share already resolved for one prompt)."""
        return self.given(budget=str(tokens), parsed_budget=Budget(str(tokens), tokens=tokens), **fields)

    def held_tokens(self, tokens: int) -> int:
        return buffer_tokens(tokens)

    def layer_budgets(self, num_layers: int, prompt_len: int) -> list[int]:
        """Tokens per KV head for each layer, bottom first."""
        return [self.kv_budget(prompt_len)] * num_layers

    def layer_plan(self, budget: int, num_kv_heads: int) -> LayerPlan:
        """One layer's cache: every KV head keeps ``budget``."""
        return LayerPlan((budget,) * num_kv_heads, self.scorer, self.decode_evict)

    def budget_stats(self, prompt_len: int, budgets: list[int]) -> dict:
        """The effective budget, and a note when a share was too small for this prompt to compress."""
        stats: dict = {"kv_budget_tokens": budgets[0]} if len(set(budgets)) == 1 else {
            "kv_budget_tokens_mean": round(sum(budgets) / len(budgets), 2), "kv_budget_tokens_per_layer": budgets}
        return stats | budget_note(self.parsed_budget, prompt_len, self.min_budget())

    def plan(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> CachePlan:
        config = model.config
        check_supported(config)
        prompt_len = prompt_length(attention_mask)
        budgets = self.layer_budgets(config.num_hidden_layers, prompt_len)
        layers = [self.layer_plan(budget, config.num_key_value_heads) for budget in budgets]
        return CachePlan.build(layers, stats=self.budget_stats(prompt_len, budgets))

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor, plan: CachePlan | None = None
                   ) -> GroupedKVCache:
        return GroupedKVCache(plan or self.plan(model, attention_mask))

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor, plan: CachePlan | None = None
               ) -> Iterator[Cache]:
        """Grouped attention over the planned cache, and hidden-state pruning when the plan prunes;
        the model's attention is put back on exit."""
        cache = self.make_cache(model, attention_mask, plan)
        with use_grouped_cache(model, cache), contextlib.ExitStack() as stack:
            if cache.plan.prune is not None:
                stack.enter_context(HiddenStatePruner(model, cache))
            yield cache

    @contextlib.contextmanager
    def resume(self, model: torch.nn.Module, cache: Cache) -> Iterator[Cache]:
        with use_grouped_cache(model, cache):
            yield cache

    def stats(self, cache: Cache) -> dict:
        return dict(cache.stats)

    def reading_key(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Hashable | None:
        """Every layer ran on the whole context; eviction while decoding also keeps the prefill's
        last queries, which a shared reading does not hold."""
        return None if self.decode_evict else "whole"


def budget_note(budget: Budget, prompt_len: int, floor: int) -> dict:
    """``{"budget_note": ...}`` when a share is too small for this prompt to compress, else ``{}``."""
    if not budget.too_small(prompt_len, floor):
        return {}
    return {"budget_note": f"budget {budget.text} of this {prompt_len}-token prompt is {budget.share_of(prompt_len)} "
                           f"tokens, under the {floor} the method keeps at least: too short to compress, kept all "
                           f"{prompt_len}"}
