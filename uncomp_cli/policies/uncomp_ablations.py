"""UNComp ablations as methods of their own, so reports and sweeps name what was switched off.

Each fixes one of UNComp's two mechanisms off (the options that would switch it back are not
theirs: the registry refuses ``--prefill-keep`` for ``uncomp-noprune``) and keeps everything else,
profile included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from uncomp_cli.policies import options
from uncomp_cli.policies.uncomp import UNCompPolicy


@dataclass(eq=False)
class UNCompNoPrunePolicy(UNCompPolicy):
    """UNComp's per-head KV budgets without hidden-state pruning: every layer sees the whole prompt."""

    name: ClassVar[str] = "uncomp-noprune"

    prefill_compression: bool = options.PREFILL_COMPRESSION.field(False, init=False)
    prefill_keep: None = options.PREFILL_KEEP.field(None, init=False)
    prefill_schedule: str = options.PREFILL_SCHEDULE.field(init=False)
    prefill_max_len: int = options.PREFILL_MAX_LEN.field(init=False)
    prefill_from: None = options.PREFILL_FROM.field(None, init=False)
    prune_heads: str = options.PRUNE_HEADS.field(init=False)
    prune_layers: str = options.PRUNE_LAYERS.field(init=False)
    prune_contexts: bool = options.PRUNE_CONTEXTS.field(init=False)


@dataclass(eq=False)
class UNCompUniformPolicy(UNCompPolicy):
    """UNComp's prefill pruning with the same budget for every KV head (no entropy-guided shares)."""

    name: ClassVar[str] = "uncomp-uniform"

    uniform_heads: bool = field(default=True, init=False)
