"""Return a cache to an earlier state: a compressed context answers one question, then the next.

A checkpoint holds the cache's layers as they were, shallowly: no tensor is copied, because every
cache update here replaces tensors (``torch.cat``, ``gather``) rather than writing into them, so
the tensors a checkpoint refers to never change. (A cache that wrote in place — pre-allocated
storage — would have to keep lengths instead.) Works for the grouped cache and for transformers'
``DynamicCache``.
"""

from __future__ import annotations

import copy

from transformers import Cache

from uncomp_cli.engine.cache import GroupedKVLayer


def _shallow(layer):
    clone = copy.copy(layer)
    if isinstance(layer, GroupedKVLayer):  # its head groups are changed in place: copy them too
        clone.groups = [copy.copy(group) for group in layer.groups]
    return clone


def checkpoint(cache: Cache) -> list:
    """The cache's state now, for :func:`rollback`."""
    return [_shallow(layer) for layer in cache.layers]


def rollback(cache: Cache, saved: list) -> None:
    """Put ``cache`` back to ``saved`` (the saved state stays reusable: it is copied again)."""
    cache.layers[:] = [_shallow(layer) for layer in saved]
