"""The uncompressed baseline: transformers' own ``DynamicCache`` with the model's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import Cache, DynamicCache

from uncomp_cli.policies.base import CachePolicy


@dataclass
class FullCachePolicy(CachePolicy):
    """Keep every token: the reference every compressed method is measured against. No options."""

    name: ClassVar[str] = "full"

    def make_cache(self, model: torch.nn.Module, attention_mask: torch.Tensor, plan=None) -> Cache:
        return DynamicCache(config=model.config)
