"""Return a cache to an earlier state: a compressed context answers one question, then the next.

A checkpoint holds the cache's layers as they were, shallowly: no tensor is copied. That is safe
because no token a checkpoint can see is ever written again: the grouped cache's updates either
replace tensors (``gather``, eviction) or write new tokens into pre-allocated slack past the
stored length, and a checkpoint keeps each head group as a snapshot without slack
(:meth:`~uncomp_cli.engine.groups.HeadGroup.snapshot`), so a state restored from it reallocates
before writing, even when checkpoints nest; ``DynamicCache`` replaces its tensors (``torch.cat``).
Works for both.
"""

from __future__ import annotations

import copy

from transformers import Cache

from uncomp_cli.engine.cache import GroupedKVLayer


def _shallow(layer):
    if isinstance(layer, GroupedKVLayer):  # its head groups are changed in place: it snapshots them
        return layer.snapshot()
    return copy.copy(layer)


def checkpoint(cache: Cache) -> list:
    """The cache's state now, for :func:`rollback`."""
    return [_shallow(layer) for layer in cache.layers]


def rollback(cache: Cache, saved: list) -> None:
    """Put ``cache`` back to ``saved`` (the saved state stays reusable: it is copied again)."""
    cache.layers[:] = [_shallow(layer) for layer in saved]
