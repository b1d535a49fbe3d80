"""H2O (Zhang et al., arXiv 2306.14048): heavy hitters plus recent tokens.

A heavy hitter is a token with a large *accumulated* attention: the sum, over every prompt query,
of the causal softmax weight that query gives it (a column sum of the attention matrix). Each KV
head keeps the ``budget − window`` heaviest earlier tokens and the last ``window`` tokens. The
column sums are computed in chunks of query rows, so the N × N matrix never exists at once.

Decoding appends by default. With ``decode_evict``, stored tokens are ranked by the attention of
the last ``window`` queries (the grouped cache's rolling score), not by a sum accumulated since
the prompt began: a running sum would need a per-token score in every head group, carried
through every eviction, in the shared cache; the recent-query sum keeps H2O's "who is attended
to now" rule and costs nothing new. This is a deviation from the paper's decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from uncomp_cli.engine.selection import SnapKVScorer, aggregate_heads
from uncomp_cli.policies import options
from uncomp_cli.policies.base import GroupedCachePolicy

#: Attention elements (rows × keys × heads × batch) computed at once: 64 MiB of float32 logits.
CHUNK_ELEMENTS = 1 << 24


def accumulated_attention(query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None,
                          scaling: float, chunk: int) -> torch.Tensor:
    """Column sums of the causal attention of all ``N`` queries, ``chunk`` query rows at a time.

    query: [B, H_q, N, d]; keys: [B, H_kv, N, d] (post-RoPE); key_valid: [B, N] bool or None.
    Returns float32 [B, H_q, N]: entry j is Σ_i softmax_i(q_i·k/√d)[j] over the rows i ≥ j that
    are real tokens (padding rows add nothing; padding keys get 0). Memory O(chunk × N).
    """
    batch, q_heads, n, dim = query.shape
    kv_heads = keys.shape[1]
    rep = q_heads // kv_heads
    keys = keys.float()
    lowest = torch.finfo(torch.float32).min
    totals = torch.zeros(batch, kv_heads, rep, n, dtype=torch.float32, device=query.device)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)  # rows start..end-1 see keys 0..end-1 at most
        rows = end - start
        q = (query[:, :, start:end].float() * scaling).reshape(batch, kv_heads, rep, rows, dim)
        logits = torch.matmul(q, keys[:, :, None, :end].transpose(-1, -2))  # [B, H_kv, rep, rows, end]
        keys_at = torch.arange(end, device=query.device)
        future = keys_at[None, :] > keys_at[start:end, None]  # [rows, end]: key after the query row
        hidden = future if key_valid is None else future | ~key_valid[:, None, None, None, :end]
        probs = torch.softmax(logits.masked_fill(hidden, lowest), dim=-1)
        if key_valid is not None:
            probs = probs * key_valid[:, None, None, start:end, None]  # padding rows count 0
        totals[..., :end] += probs.sum(dim=-2)
    return totals.reshape(batch, q_heads, n)


@dataclass(frozen=True)
class H2OScorer(SnapKVScorer):
    """Accumulated attention at prefill (no pooling, as in the paper); the window score while
    evicting during decoding (see the module docstring)."""

    kernel: int = 1
    needs_all_queries = True

    def score_prefill(self, query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None,
                      scaling: float, window_probs: torch.Tensor) -> torch.Tensor:
        batch, q_heads, n, _ = query.shape
        chunk = max(1, CHUNK_ELEMENTS // (batch * q_heads * n))
        totals = accumulated_attention(query, keys, key_valid, scaling, chunk)
        scores = aggregate_heads(totals, keys.shape[1], self.aggregate)
        return scores if key_valid is None else scores.masked_fill(~key_valid[:, None, :], float("-inf"))


@dataclass
class H2OPolicy(GroupedCachePolicy):
    """``budget`` tokens per KV head (``128`` or ``"5%"`` of the longest prompt): the last
    ``window`` tokens plus the heaviest hitters among the rest; ``aggregate`` combines the query
    heads of a KV head (GQA). No pooling: the paper scores single tokens."""

    name: ClassVar[str] = "h2o"

    budget: int | str = options.option_field("budget")
    window: int = options.option_field("window")
    aggregate: str = options.option_field("aggregate")
    decode_evict: bool = options.option_field("decode_evict")

    def make_scorer(self) -> H2OScorer:
        return H2OScorer(window=self.window, aggregate=self.aggregate)
