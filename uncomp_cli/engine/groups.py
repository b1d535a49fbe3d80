"""The KV heads of a layer that share a budget: their stored tokens and selection (their attention:
:mod:`uncomp_cli.engine.attend`).

A group stores one dense tensor for K and one for V, ``[B, heads_in_group, T_group, head_dim]``,
holding only its kept tokens, per **KV head** (never repeated per query head), with the per-row
validity of each stored token. Used by :class:`~uncomp_cli.engine.cache.GroupedKVLayer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uncomp_cli.engine.selection import select_tokens, select_tokens_per_row
from uncomp_cli.errors import UncompError


class HeadGroup:
    """The KV heads of one layer that share a budget, and the tokens they keep."""

    def __init__(self, heads: list[int], budget: int | None):
        self.heads = heads  # KV head indices, ascending
        self.budget = budget  # tokens kept per head; None = keep all
        #: [B, h] tokens each row keeps when rows differ (AdaKV); ``budget`` is then their max, and a
        #: row's surplus entries are invalid fillers.
        self.row_budgets: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None  # [B, h, T, d]
        self.values: torch.Tensor | None = None  # [B, h, T, d]
        self.valid: torch.Tensor | None = None  # [B, h, T] bool; False = padding, never attended
        self.positions: torch.Tensor | None = None  # [B, h, T] int64: each stored token's original position
        self.all_valid = True  # fast path: no padding stored

    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def store(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> None:
        self.keys, self.values, self.valid, self.positions = keys, values, valid, positions
        self.all_valid = bool(valid.all())

    def take(self, index: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Keep the stored tokens at ``index`` [B, h, T'] (ascending); ``kept`` False marks fillers."""
        dim = self.keys.shape[-1]
        expanded = index[..., None].expand(-1, -1, -1, dim)
        valid = self.valid.gather(2, index)
        self.store(self.keys.gather(2, expanded), self.values.gather(2, expanded),
                   valid if kept is None else valid & kept, self.positions.gather(2, index))

    def keep_index(self, scores: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which tokens to keep from scores [B, h, N]: (indices [B, h, T], kept [B, h, T] or None)."""
        if self.row_budgets is None:
            return select_tokens(scores, self.budget, window), None
        return select_tokens_per_row(scores, self.row_budgets, window)


def take_heads(tensor: torch.Tensor, heads: list[int], per_head: int = 1) -> torch.Tensor:
    """Select heads (dim 1) of ``tensor``; ``per_head`` > 1 selects the query heads of KV heads."""
    total = tensor.shape[1]
    first = heads[0] * per_head
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return tensor[:, first: first + len(heads) * per_head] if len(heads) * per_head != total else tensor
    index = torch.tensor([h * per_head + r for h in heads for r in range(per_head)], device=tensor.device)
    return tensor.index_select(1, index)


def group_heads(budgets: Sequence[int | None]) -> list[HeadGroup]:
    """One group per distinct budget, its KV heads ascending."""
    by_budget: dict[int | None, list[int]] = {}
    for head, budget in enumerate(budgets):
        if budget is not None and budget < 1:
            raise UncompError(f"KV head {head} has a budget of {budget} tokens; it must be at least 1")
        by_budget.setdefault(None if budget is None else int(budget), []).append(head)
    return [HeadGroup(heads, budget) for budget, heads in by_budget.items()]
