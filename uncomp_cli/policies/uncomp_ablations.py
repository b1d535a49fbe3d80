"""UNComp ablations as methods of their own, so reports and sweeps name what was switched off.

Each fixes one of UNComp's two mechanisms off (the field is not settable: ``make_policy`` ignores
the command line's ``--prefill-compression`` for them) and keeps everything else, profile included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uncomp_cli.policies.uncomp import UNCompPolicy


@dataclass(eq=False)
class UNCompNoPrunePolicy(UNCompPolicy):
    """UNComp's per-head KV budgets without hidden-state pruning: every layer sees the whole prompt."""

    prefill_compression: bool = field(default=False, init=False)
    name: str = "uncomp-noprune"


@dataclass(eq=False)
class UNCompUniformPolicy(UNCompPolicy):
    """UNComp's prefill pruning with the same budget for every KV head (no entropy-guided shares)."""

    uniform_heads: bool = field(default=True, init=False)
    name: str = "uncomp-uniform"
