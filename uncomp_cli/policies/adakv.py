"""AdaKV (Feng et al., arXiv 2407.11550): per layer, the KV heads share one budget, allocated by
a layer-wide top-k over their SnapKV scores.

A head whose attention is spread over many tokens takes more of the layer's budget than one that
concentrates on a few, which needs few to keep most of its attention mass; a safeguard ``floor``
keeps every head at least that share of the average. Each head then keeps its own top tokens plus
the observation window, SnapKV-style. Budgets are known only at prefill, so each layer re-forms its
groups then (see ``budget_allocator`` in :mod:`uncomp_cli.engine.cache`): the bytes held are the
allocated budgets, not a full-size cache with a mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from uncomp_cli.defaults import DEFAULT_ADAKV_FLOOR
from uncomp_cli.engine.plan import LayerPlan
from uncomp_cli.engine.selection import top_indices
from uncomp_cli.errors import UncompError
from uncomp_cli.policies import options
from uncomp_cli.policies.snapkv import SnapKVPolicy


def adakv_budgets(scores: torch.Tensor, budget: int, window: int, floor: float = DEFAULT_ADAKV_FLOOR
                  ) -> torch.Tensor:
    """Tokens each KV head of one layer keeps, per row: AdaKV's allocation of ``H_kv × budget``.

    scores: [B, H_kv, N] prefill scores, -inf for padding (never chosen, never counted).
    Every head keeps its last ``min(window, budget)`` tokens; the rest of the layer's budget,
    ``H_kv × (budget − window)`` tokens, goes first ⌈``floor`` × (budget − window)⌉ to each head
    (its best ones: the safeguard), then to the highest remaining scores of the whole layer
    (ties: lower head, then earlier token, so a padded row allocates as it would alone). A row
    whose prompt fits in ``budget`` keeps all of it. Returns int64 [B, H_kv], each row summing to
    ``H_kv × budget`` (or ``H_kv ×`` its length).
    """
    batch, heads, n = scores.shape
    lengths = (scores > float("-inf")).sum(dim=-1).amax(dim=-1)  # [B] real tokens per row
    whole = lengths[:, None].expand(batch, heads)
    if budget >= n:
        return whole.clone()
    recent = min(window, budget)
    extra = budget - recent  # tokens a head chooses beyond the window, on average
    prefix = scores[..., : n - recent]
    guaranteed = math.ceil(floor * extra)
    if guaranteed:
        prefix = prefix.scatter(-1, top_indices(prefix, guaranteed), float("inf"))
    head_of = top_indices(prefix.reshape(batch, -1), heads * extra) // (n - recent)  # [B, H × extra]
    counts = torch.zeros(batch, heads, dtype=torch.long, device=scores.device)
    counts.scatter_add_(1, head_of, torch.ones_like(head_of))
    return torch.where(lengths[:, None] > budget, recent + counts, whole)


@dataclass
class AdaKVPolicy(SnapKVPolicy):
    """SnapKV's scores and options, with ``budget`` the average tokens per KV head (``128``, or
    ``"5%"`` of the prompt — of the longest row in a batch); ``floor`` (0–1): the safeguard share of
    it, beyond the window, that every head keeps. ``floor=1`` gives every head the average: SnapKV.

    Batches: each row is allocated from its own scores; a KV head stores the most any row gave it
    and marks a row's surplus entries invalid, so every row keeps exactly what it would alone.
    """

    name: ClassVar[str] = "adakv"

    floor: float = options.option_field("floor")

    def validate(self) -> None:
        if isinstance(self.floor, bool) or not isinstance(self.floor, int | float) or not 0 <= self.floor <= 1:
            raise UncompError(f"--floor must be a share between 0 and 1, got {self.floor!r}")

    def layer_plan(self, budget: int, num_kv_heads: int) -> LayerPlan:
        """Every head starts at the average; the layer re-forms its groups from the allocation at prefill."""
        allocate = functools.partial(adakv_budgets, budget=budget, window=self.window, floor=self.floor)
        return LayerPlan((budget,) * num_kv_heads, self.scorer, self.decode_evict, allocate)
