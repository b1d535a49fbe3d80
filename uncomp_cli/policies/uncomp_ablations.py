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

    prefill_compression: bool = options.option_field("prefill_compression", False, init=False)
    prefill_keep: None = options.option_field("prefill_keep", None, init=False)
    prefill_schedule: str = options.option_field("prefill_schedule", init=False)
    prefill_max_len: int = options.option_field("prefill_max_len", init=False)
    prefill_from: None = options.option_field("prefill_from", None, init=False)
    prune_heads: str = options.option_field("prune_heads", init=False)
    prune_layers: str = options.option_field("prune_layers", init=False)
    prune_contexts: bool = options.option_field("prune_contexts", init=False)


@dataclass(eq=False)
class UNCompUniformPolicy(UNCompPolicy):
    """UNComp's prefill pruning with the same budget for every KV head (no entropy-guided shares)."""

    name: ClassVar[str] = "uncomp-uniform"

    uniform_heads: bool = field(default=True, init=False)
