"""Which tokens to keep: pure tensor functions for SnapKV-style scoring and top-k selection.

Everything here is a function of tensors (no model, no cache), so the KV cache, the hidden-state
pruner and other methods (H2O, StreamingLLM: other scores, same top-k) share one implementation.

Shape letters: B batch, H_q query heads, H_kv key/value heads, N tokens, w window rows, d head dim.
Query heads sharing a KV head are consecutive (head h reads KV head h // (H_q / H_kv)), as in
transformers' ``repeat_kv``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Defaults live in uncomp_cli/defaults.py (torch-free, so --help can show them). The official code
# uses window 8 / kernel 7; on SmolLM2-135M that loses the digits of a needle (kvpress: 0/5 at
# 5-10 % of the cache) while window 32 / kernel 21 keeps them. See docs/results.md.
from uncomp_cli.defaults import (
    DEFAULT_AGGREGATE,
    DEFAULT_KERNEL,
    DEFAULT_POOLING,
    DEFAULT_WINDOW,
)
from uncomp_cli.errors import UncompError

#: Most recent tokens that hidden-state pruning always carries on (the official code's window: 8).
PRUNE_WINDOW = 8

POOLINGS = ("max", "avg")
AGGREGATES = ("mean", "max")


def window_attention(query_window: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None,
                     scaling: float, query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities of the last ``w`` queries over all ``N`` keys, never N × N.

    query_window: [B, H_q, w, d] — the queries of the last ``w`` of the ``N`` tokens (post-RoPE).
    keys: [B, H_kv, N, d]. key_valid: [B, N] or [B, H_kv, N] bool (False: padding or dropped),
    None = all valid. query_valid: [B, w] bool, None = all valid.
    Returns float32 [B, H_q, w, N]: row i is the softmax of q_i·k/√d over the keys it may see —
    causal (row i is token N − w + i), invalid keys get 0, invalid query rows are all 0.
    """
    batch, q_heads, rows, dim = query_window.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    if rows > n:
        raise UncompError(f"window of {rows} queries is longer than the {n} keys it scores")
    rep = q_heads // kv_heads
    # Few elementwise passes over [B, H, w, N]: on CPUs they, not the matmul, dominate the cost.
    q = (query_window.float() * scaling).reshape(batch, kv_heads, rep * rows, dim)
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).view(batch, kv_heads, rep, rows, n)
    lowest = torch.finfo(torch.float32).min  # finite: a row with nothing visible stays finite
    if key_valid is not None:
        kv = key_valid if key_valid.dim() == 3 else key_valid[:, None, :]
        logits = logits.masked_fill(~kv[:, :, None, None, :], lowest)
        if query_valid is None and key_valid.dim() == 2:
            query_valid = key_valid[:, n - rows:]  # the window rows are the last tokens
    # Causality only concerns the last `rows` keys: row i (token N − w + i) sees up to itself.
    future = torch.ones(rows, rows, dtype=torch.bool, device=keys.device).triu(1)
    logits[..., n - rows:] = logits[..., n - rows:].masked_fill(future, lowest)
    probs = torch.softmax(logits, dim=-1)
    if query_valid is not None:
        probs = probs * query_valid[:, None, None, :, None]  # padding rows (uniform junk) count 0
    return probs.reshape(batch, q_heads, rows, n)


def aggregate_heads(scores: torch.Tensor, num_kv_heads: int, how: str = DEFAULT_AGGREGATE) -> torch.Tensor:
    """Combine the scores of the query heads that share a KV head. [B, H_q, N] -> [B, H_kv, N]."""
    batch, q_heads, n = scores.shape
    grouped = scores.view(batch, num_kv_heads, q_heads // num_kv_heads, n)
    if how == "mean":
        return grouped.mean(dim=2)
    if how == "max":
        return grouped.amax(dim=2)
    raise UncompError(f"unknown head aggregation {how!r}; choose one of {', '.join(AGGREGATES)}")


def pool_scores(scores: torch.Tensor, kernel: int = DEFAULT_KERNEL, pooling: str = DEFAULT_POOLING,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Spread each score to its neighbours so runs of tokens (numbers, words) survive together.

    scores: [..., N] -> [..., N] (odd ``kernel``, stride 1, same length; 1 = no pooling).
    valid: bool, broadcastable to ``scores``; invalid neighbours (padding) count like the edge of
    the sequence, so a padded row pools exactly as it would alone.
    """
    if kernel == 1:
        return scores
    shape = scores.shape
    if valid is not None:
        valid = valid.expand(shape)
    if pooling == "max":
        flat = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
        pooled = F.max_pool1d(flat.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    elif pooling == "avg":
        if valid is None:
            pooled = F.avg_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2,
                                  count_include_pad=False)
        else:
            weight = valid.to(scores.dtype).reshape(-1, 1, shape[-1])
            total = F.avg_pool1d(scores.masked_fill(~valid, 0).reshape(-1, 1, shape[-1]), kernel, stride=1,
                                 padding=kernel // 2)
            count = F.avg_pool1d(weight, kernel, stride=1, padding=kernel // 2)
            pooled = total / count.clamp(min=1e-12)
    else:
        raise UncompError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    return pooled.reshape(shape)


def snapkv_scores(window_probs: torch.Tensor, key_valid: torch.Tensor | None, num_kv_heads: int,
                  window: int = DEFAULT_WINDOW, kernel: int = DEFAULT_KERNEL,
                  pooling: str = DEFAULT_POOLING, aggregate: str = DEFAULT_AGGREGATE) -> torch.Tensor:
    """SnapKV score of every key from precomputed window probabilities.

    window_probs: [B, H_q, r, N] from :func:`window_attention` with r ≥ ``window`` (only the last
    ``window`` rows are used, so one pass can serve several consumers).
    key_valid: [B, N] or [B, H_kv, N] bool or None. Returns float32 [B, H_kv, N]; invalid keys -inf.
    """
    summed = window_probs[:, :, -window:].sum(dim=-2)  # [B, H_q, N]
    kv = None
    if key_valid is not None:
        kv = key_valid if key_valid.dim() == 3 else key_valid[:, None, :]
    scores = pool_scores(aggregate_heads(summed, num_kv_heads, aggregate), kernel, pooling, kv)
    return scores if kv is None else scores.masked_fill(~kv, float("-inf"))


#: How the pruning score combines the query heads: ``sum`` (the official code) or ``max``.
PRUNE_HEADS = ("sum", "max")
#: Which layers' scores decide a pruning point: the one before it, or every one since the last point.
PRUNE_LAYERS = ("last", "span")


def prune_scores(window_probs: torch.Tensor, rows: int = DEFAULT_WINDOW, kernel: int = DEFAULT_KERNEL,
                 pooling: str = DEFAULT_POOLING, valid: torch.Tensor | None = None, heads: str = "sum") -> torch.Tensor:
    """Hidden-state pruning score: probabilities of the last ``rows`` queries summed over rows, then
    summed over all heads (``heads="sum"``) or the largest of any head (``"max"``: a token one
    retrieval head looks at counts as much as one every head does), then pooled like the KV
    selection. [B, H_q, r, N] -> [B, N].

    The official code sums the last 8 rows without pooling; on SmolLM2-135M that drops the digits
    of a needle piecemeal, while the KV selection's window and pooling keep them (docs/results.md).
    """
    window = window_probs[:, :, -rows:]
    combined = window.sum(dim=2).amax(dim=1) if heads == "max" else window.sum(dim=(1, 2))
    return pool_scores(combined, kernel, pooling, valid)


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dim, best first; ties go to the earlier
    token. Max pooling makes plateaus of equal scores, and ``topk`` breaks ties arbitrarily, which
    would make a padded row choose differently from the same prompt alone."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def select_tokens(scores: torch.Tensor, budget: int, window: int) -> torch.Tensor:
    """Indices of the tokens to keep per head, in original order.

    scores: [B, H, N] (-inf = never keep unless the budget cannot be filled otherwise).
    The last ``min(window, budget)`` tokens are always kept; the rest of the budget goes to the
    highest scores among the earlier tokens. Returns int64 [B, H, min(budget, N)], ascending.
    """
    batch, heads, n = scores.shape
    if budget < 1:
        raise UncompError(f"a KV budget must be at least 1 token, got {budget}")
    if budget >= n:
        return torch.arange(n, device=scores.device).expand(batch, heads, n)
    recent = min(window, budget)
    top = top_indices(scores[..., : n - recent], budget - recent)
    tail = torch.arange(n - recent, n, device=scores.device).expand(batch, heads, recent)
    return torch.cat([top.sort(dim=-1).values, tail], dim=-1)


def select_rows(scores: torch.Tensor, keep: torch.Tensor, window: int = PRUNE_WINDOW
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens to carry into the next layer when each row keeps its own number of tokens.

    scores: [B, N] (-inf for padding). keep: int64 [B], tokens each row keeps (≥ ``window``
    unless the row has fewer). Returns (indices [B, n], kept [B, n] bool) with n = max(keep).
    A row that keeps fewer than n is filled with its lowest-ranked tokens marked ``kept`` False
    and placed *first*, so the kept tokens end each row in ascending original order exactly as
    they would alone (the last positions stay the last prompt tokens). The last ``window`` real
    tokens are always kept.
    """
    batch, n_tokens = scores.shape
    width = int(keep.max())
    recent = min(window, n_tokens)
    forced = scores.clone()
    tail = forced[:, n_tokens - recent:]
    forced[:, n_tokens - recent:] = tail.masked_fill(tail > float("-inf"), float("inf"))  # padding stays out
    ranked = top_indices(forced, width)  # [B, n], best first
    kept = torch.arange(width, device=scores.device)[None, :] < keep[:, None]
    order = torch.where(kept, ranked, ranked - n_tokens).argsort(dim=-1)  # fillers first, then ascending
    return ranked.gather(1, order), kept.gather(1, order)


def select_tokens_per_row(scores: torch.Tensor, budgets: torch.Tensor, window: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`select_tokens` when every row and head keeps its own number of tokens (AdaKV batches).

    scores: [B, H, N] (-inf = padding or invalid); budgets: int64 [B, H], each at most the row's
    valid tokens. Each (row, head) keeps the same tokens :func:`select_tokens` would keep for it
    alone: its last ``min(window, budget)`` and its top-scored others. Returns (indices [B, H, T],
    kept [B, H, T] bool) with T = max(budgets): a head that keeps fewer than T is filled with its
    next-ranked tokens marked ``kept`` False and placed *first*, so the kept ones end each row in
    ascending order and the last stored tokens stay the last ones seen (what decoding relies on).
    """
    n = scores.shape[-1]
    width = min(int(budgets.max()), n)
    recent = budgets.clamp(max=window)[..., None]  # [B, H, 1]
    tail = torch.arange(n, device=scores.device) >= n - recent
    forced = scores.masked_fill(tail & (scores > float("-inf")), float("inf"))  # padding stays out
    ranked = top_indices(forced, width)  # [B, H, T], best first
    kept = torch.arange(width, device=scores.device) < budgets[..., None]
    order = torch.where(kept, ranked, ranked - n).argsort(dim=-1)  # fillers first, then ascending
    return ranked.gather(-1, order), kept.gather(-1, order)


@dataclass(frozen=True)
class Budget:
    """A KV budget as written: a token count (``128``) or a share of the prompt (``"5%"``)."""

    text: str
    tokens: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, spec: str | int) -> Budget:
        """Read ``"5%"``, ``128`` or ``"128"``; bare fractions such as ``0.05`` are refused as ambiguous."""
        text = str(spec).strip()
        try:
            if text.endswith("%"):
                percent = float(text[:-1])
                if not 0 < percent <= 100:  # also refuses nan
                    raise UncompError(f"budget {text} must be more than 0% and at most 100%")
                return cls(text, percent=percent)
            if isinstance(spec, float) or "." in text:
                raise UncompError(f"budget {text!r} is ambiguous: write a token count (128) or a percentage (5%)")
            tokens = int(text)
        except ValueError:
            raise UncompError(f"budget {text!r} is not a token count (128) or a percentage (5%)") from None
        if tokens < 1:
            raise UncompError(f"budget {text} must be at least 1 token")
        return cls(text, tokens=tokens)

    def share_of(self, prompt_len: int) -> int:
        """Tokens before any floor or clipping: the count, or the share rounded up."""
        return self.tokens if self.tokens is not None else math.ceil(self.percent / 100 * prompt_len)

    def too_small(self, prompt_len: int, floor: int) -> bool:
        """Whether this is a *share* that falls below ``floor`` (the tokens the selection itself must
        keep, e.g. the observation window) on a prompt this short.

        Such a prompt has nothing worth compressing (10 % of a 37-token question is 4 tokens): it is
        kept whole, since keeping only the window would drop its first tokens, which the model
        attends to as sinks. A token count below the floor is the user's explicit choice and stays
        an error (:func:`resolve_budget`).
        """
        return self.percent is not None and min(self.share_of(prompt_len), prompt_len) < min(floor, prompt_len)


def resolve_budget(spec: Budget | str | int, prompt_len: int, window: int = DEFAULT_WINDOW, clip: bool = True) -> int:
    """Tokens kept per KV head for a prompt of ``prompt_len`` tokens.

    ``"5%"`` is a share of the prompt (rounded up) and ``128`` or ``"128"`` a token count
    (:meth:`Budget.parse`). A budget larger than the prompt keeps everything (clipped to
    ``prompt_len`` unless ``clip`` is off: an average that a profile spreads over heads is clipped
    per head instead). A share below the observation ``window`` keeps the whole prompt
    (:meth:`Budget.too_small`); a token count below it that would still drop tokens is an error.
    Policies pass the :class:`Budget` they parsed when they were made.
    """
    budget = spec if isinstance(spec, Budget) else Budget.parse(spec)
    if budget.too_small(prompt_len, window):
        return prompt_len
    tokens = budget.share_of(prompt_len)
    if clip:
        tokens = min(tokens, prompt_len)
    if tokens < min(window, prompt_len):  # only a token count gets here: it is below the window
        raise UncompError(f"budget {budget.text} is below the {window}-token observation window; raise the budget "
                          "or lower the window")
    return tokens


@dataclass(frozen=True)
class SnapKVScorer:
    """SnapKV (arXiv 2404.14469): keys the last ``window`` queries attend to most, pooled.

    A scorer turns one layer's prefill attention into per-KV-head token scores; other methods
    subclass it and override :meth:`score`.
    """

    window: int = DEFAULT_WINDOW
    kernel: int = DEFAULT_KERNEL
    pooling: str = DEFAULT_POOLING
    aggregate: str = DEFAULT_AGGREGATE
    #: Whether :meth:`score_prefill` reads every prompt query, not only the window's (then a prompt
    #: is scored in one piece, never in chunks).
    needs_all_queries = False

    def __post_init__(self) -> None:
        if self.window < 1:
            raise UncompError(f"--window must be at least 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UncompError(f"--kernel must be an odd number ≥ 1, got {self.kernel}")
        if self.pooling not in POOLINGS:
            raise UncompError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.aggregate not in AGGREGATES:
            raise UncompError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")

    def score(self, window_probs: torch.Tensor, key_valid: torch.Tensor | None,
              num_kv_heads: int) -> torch.Tensor:
        """window_probs: [B, H_q, r, N] (r ≥ min(window, N)); key_valid: [B, N] / [B, H_kv, N]
        -> [B, H_kv, N], invalid keys -inf."""
        rows = min(self.window, window_probs.shape[2])
        return snapkv_scores(window_probs, key_valid, num_kv_heads, rows, self.kernel, self.pooling,
                             self.aggregate)

    def score_prefill(self, query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor | None,
                      scaling: float, window_probs: torch.Tensor) -> torch.Tensor:
        """Scores at the end of prefill, where every query is still at hand.

        query: [B, H_q, N, d]; keys: [B, H_kv, N, d]; key_valid: [B, N] or None; window_probs as
        for :meth:`score`. Window scorers use only ``window_probs``; scorers that need all queries
        (H2O's accumulated attention) override this. -> [B, H_kv, N], invalid keys -inf.
        """
        return self.score(window_probs, key_valid, keys.shape[1])
