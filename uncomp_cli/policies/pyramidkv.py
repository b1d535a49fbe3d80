"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV selection with budgets that shrink with depth.

Lower layers attend broadly and keep more; upper layers attend to few tokens and keep less. The
per-layer budgets fall arithmetically from the bottom layer to the top and average the requested
budget, as in the official code (KVCache-Factory ``PyramidKVCluster``): beyond the ``window``,
the top layer keeps ``1/beta`` of the average share and the bottom layer twice the average minus
that; when the bottom layer would need more than the prompt, it keeps the whole prompt and the
top layer takes up the difference. Every KV head of a layer shares its layer's budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from uncomp_cli.defaults import DEFAULT_PYRAMID_BETA
from uncomp_cli.errors import UncompError
from uncomp_cli.policies import options
from uncomp_cli.policies.snapkv import SnapKVPolicy


def pyramid_budgets(budget: int, prompt_len: int, window: int, num_layers: int,
                    beta: float = DEFAULT_PYRAMID_BETA) -> list[int]:
    """Tokens kept per layer, bottom first: non-increasing, averaging ``budget`` exactly (in whole
    tokens: the remainder goes to the layers the linear schedule rounds up most), each between
    ``min(window, prompt_len)`` and ``prompt_len``. ``budget`` is already resolved and clipped."""
    if budget >= prompt_len:
        return [prompt_len] * num_layers
    window = min(window, prompt_len)
    share = budget - window  # the selected part, beyond the always-kept window
    if num_layers == 1 or share == 0:
        return [budget] * num_layers
    top = share / Fraction(beta)  # exact arithmetic: the rounding below must see true fractions
    bottom = 2 * share - top
    if bottom > prompt_len - window:  # the bottom layer cannot keep more than the prompt
        bottom = prompt_len - window
        top = 2 * share - bottom
    exact = [bottom - (bottom - top) * layer / (num_layers - 1) for layer in range(num_layers)]
    kept = [math.floor(value) for value in exact]
    remainder = share * num_layers - sum(kept)
    # Largest fractional parts first, earlier layers on ties: keeps the schedule non-increasing.
    for layer in sorted(range(num_layers), key=lambda i: (kept[i] - exact[i], i))[:remainder]:
        kept[layer] += 1
    return [window + value for value in kept]


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV's selection and options, with ``budget`` the average tokens per KV head over layers
    (``128`` or ``"5%"`` of the longest prompt); ``beta``: how steep the pyramid is (1 = flat, SnapKV)."""

    name: ClassVar[str] = "pyramidkv"

    beta: float = options.option_field("beta")

    def validate(self) -> None:
        if not self.beta >= 1:  # also refuses nan
            raise UncompError(f"--beta must be at least 1 (1 = the same budget in every layer), got {self.beta}")

    def layer_budgets(self, num_layers: int, prompt_len: int) -> list[int]:
        """Tokens per KV head for each layer, bottom first, for a prompt of ``prompt_len``."""
        return pyramid_budgets(self.kv_budget(prompt_len), prompt_len, self.window, num_layers, self.beta)
