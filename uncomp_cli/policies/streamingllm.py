"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks plus the most recent tokens.

Every KV head keeps the first ``sinks`` real tokens of its row (the "attention sinks" that soak up
attention mass) and the ``budget − sinks`` most recent ones. Realised as a score of positions, so
the same top-k selection and the same grouped cache (real bytes) serve it as SnapKV; with
``decode_evict`` the cache keeps sinks plus a rolling recent window, the paper's streaming mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from uncomp_cli.defaults import DEFAULT_SINKS
from uncomp_cli.engine.selection import SnapKVScorer, resolve_budget
from uncomp_cli.errors import UncompError
from uncomp_cli.policies import options
from uncomp_cli.policies.base import GroupedCachePolicy


def sink_and_recent_scores(key_valid: torch.Tensor | None, batch: int, num_kv_heads: int, n: int, sinks: int,
                           device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores that rank the first ``sinks`` real tokens of each row first, then later tokens over
    earlier ones. key_valid: [B, N] / [B, H_kv, N] bool or None -> float32 [B, H_kv, N], invalid -inf.

    Sinks are counted among *valid* tokens, so a left-padded row picks the same tokens as alone.
    """
    positions = torch.arange(n, device=device, dtype=torch.float32).expand(batch, num_kv_heads, n)
    if key_valid is None:
        rank = positions
        valid = None
    else:
        valid = (key_valid if key_valid.dim() == 3 else key_valid[:, None, :]).expand(batch, num_kv_heads, n)
        rank = valid.long().cumsum(-1) - 1  # index among the row's real tokens
    scores = torch.where(rank < sinks, float(2 * n), positions)  # sinks outrank every recent token
    return scores if valid is None else scores.masked_fill(~valid, float("-inf"))


@dataclass(frozen=True)
class StreamingLLMScorer(SnapKVScorer):
    """Position scores (attention is not looked at). ``window`` 1: the selection's forced recent
    part is only the last token, so the sinks always fit in the budget; recency does the rest."""

    window: int = 1
    kernel: int = 1
    sinks: int = DEFAULT_SINKS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise UncompError(f"--sinks must be 0 or more, got {self.sinks}")

    def score(self, window_probs: torch.Tensor, key_valid: torch.Tensor | None, num_kv_heads: int) -> torch.Tensor:
        batch, n = window_probs.shape[0], window_probs.shape[-1]
        return sink_and_recent_scores(key_valid, batch, num_kv_heads, n, self.sinks, window_probs.device)


@dataclass
class StreamingLLMPolicy(GroupedCachePolicy):
    """``budget`` tokens per KV head (``128`` or ``"5%"`` of the longest prompt): ``sinks`` first
    tokens plus ``budget − sinks`` recent ones. Attention is not looked at, so it takes no selection
    options. A share of a prompt so short that it leaves no recent token keeps the whole prompt."""

    name: ClassVar[str] = "streamingllm"
    selects_by_attention: ClassVar[bool] = False

    budget: int | str = options.option_field("budget")
    sinks: int = options.option_field("sinks")
    decode_evict: bool = options.option_field("decode_evict")

    def make_scorer(self) -> StreamingLLMScorer:
        return StreamingLLMScorer(sinks=self.sinks)

    def min_budget(self) -> int:
        return self.sinks + 1

    def kv_budget(self, prompt_len: int) -> int:
        """Tokens per KV head for a prompt of ``prompt_len``; refuses budgets with no recent part."""
        if self.parsed_budget.too_small(prompt_len, self.min_budget()):
            return prompt_len
        budget = resolve_budget(self.parsed_budget, prompt_len, window=1)
        if budget < prompt_len and budget <= self.sinks:
            raise UncompError(f"budget {self.budget} is {budget} tokens, no room for recent tokens after the "
                              f"{self.sinks} attention sinks; raise the budget or lower --sinks")
        return budget
