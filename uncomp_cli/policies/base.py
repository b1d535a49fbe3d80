"""The contract between the generation loop and a cache policy.

The loop in :mod:`uncomp_cli.engine.generation` does not know what a method keeps; it asks the policy for
a cache and runs prefill and decoding inside :meth:`CachePolicy.attach`, which may install an
attention implementation or hooks for the duration and must remove them on exit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import Cache


class CachePolicy:
    """Base policy. Subclasses are small dataclasses whose fields are their hyperparameters."""

    #: The ``--method`` name.
    name: str = "base"

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Cache:
        """A fresh cache for one prefill of prompts padded to ``attention_mask`` [B, S]."""
        raise NotImplementedError

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Iterator[Cache]:
        """Yield a cache to prefill and decode with; undo any change to ``model`` on exit."""
        yield self.make_cache(model, attention_mask)

    def describe(self) -> dict:
        """Settings that identify this policy in reports (JSON-serialisable)."""
        return {"method": self.name}


class GroupedCachePolicy(CachePolicy):
    """A policy whose cache is a :class:`~uncomp_cli.engine.cache.GroupedKVCache`: ``attach`` installs the
    grouped attention over the cache ``make_cache`` builds, and puts the model's back on exit."""

    @contextlib.contextmanager
    def attach(self, model: torch.nn.Module, attention_mask: torch.Tensor) -> Iterator[Cache]:
        from uncomp_cli.engine.cache import use_grouped_cache

        with use_grouped_cache(model, self.make_cache(model, attention_mask)) as cache:
            yield cache
