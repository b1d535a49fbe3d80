"""SnapKV (Li et al., arXiv 2404.14469): one budget for every KV head, chosen at the end of prefill.

Each KV head keeps the tokens the last ``window`` queries attended to most (scores pooled over
``kernel`` neighbours, query heads of a GQA group combined by ``aggregate``) plus the window
itself. Storage is per KV head and really shrinks (see :mod:`uncomp_cli.engine.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from uncomp_cli.policies import options
from uncomp_cli.policies.base import GroupedCachePolicy


@dataclass
class SnapKVPolicy(GroupedCachePolicy):
    """``budget``: tokens per KV head (``128``) or a share of the prompt (``"5%"``, of the longest
    row in a batch); resolved with :func:`~uncomp_cli.engine.selection.resolve_budget`."""

    name: ClassVar[str] = "snapkv"

    budget: int | str = options.option_field("budget")
    window: int = options.option_field("window")
    kernel: int = options.option_field("kernel")
    pooling: str = options.option_field("pooling")
    aggregate: str = options.option_field("aggregate")
    decode_evict: bool = options.option_field("decode_evict")
