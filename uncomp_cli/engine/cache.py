"""A KV cache that keeps a different number of tokens per group of KV heads, with real savings.

Layout (DuoAttention's, no custom kernels): per layer, the KV heads that share a budget form a
group stored as one dense tensor for K and one for V, ``[B, heads_in_group, T_group, head_dim]``,
holding only the kept tokens. K/V are stored per **KV head** (GQA-aware: never repeated per query
head). Each group also keeps the per-row validity of its stored tokens ``[B, heads, T]`` (False for
left padding), because transformers builds one mask per forward, sized for one length, and that
cannot describe groups of different lengths or non-contiguous kept positions.

So attention runs in a custom attention function registered as ``"uncomp"``
(:mod:`uncomp_cli.engine.attention`): the cache layer's ``update`` only counts tokens; the attention
function finds the layer through a reference set on each attention module, and the layer attends
per group with SDPA using its own validity and a causal rule. At prefill (the first forward a
layer sees) it attends with full K/V, scores the tokens with the last ``window`` queries and
stores only the selected ones, so at most one layer's full K/V exists at a time.

``get_seq_length()`` counts tokens *seen* (positions never come from stored lengths); callers pass
explicit ``position_ids``, or use ``generate``, which derives them from the attention mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from uncomp_cli.engine.attention import ATTN_IMPLEMENTATION
from uncomp_cli.engine.selection import (
    PRUNE_WINDOW,
    SnapKVScorer,
    prune_scores,
    select_tokens,
    select_tokens_per_row,
    window_attention,
)
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
        self.all_valid = True  # fast path: no padding stored

    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def store(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        self.keys, self.values, self.valid = keys, values, valid
        self.all_valid = bool(valid.all())

    def take(self, index: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Keep the stored tokens at ``index`` [B, h, T'] (ascending); ``kept`` False marks fillers."""
        dim = self.keys.shape[-1]
        expanded = index[..., None].expand(-1, -1, -1, dim)
        valid = self.valid.gather(2, index)
        self.store(self.keys.gather(2, expanded), self.values.gather(2, expanded),
                   valid if kept is None else valid & kept)

    def keep_index(self, scores: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which tokens to keep from scores [B, h, N]: (indices [B, h, T], kept [B, h, T] or None)."""
        if self.row_budgets is None:
            return select_tokens(scores, self.budget, window), None
        return select_tokens_per_row(scores, self.row_budgets, window)


def _take_heads(tensor: torch.Tensor, heads: list[int], per_head: int = 1) -> torch.Tensor:
    """Select heads (dim 1) of ``tensor``; ``per_head`` > 1 selects the query heads of KV heads."""
    total = tensor.shape[1]
    first = heads[0] * per_head
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return tensor[:, first: first + len(heads) * per_head] if len(heads) * per_head != total else tensor
    index = torch.tensor([h * per_head + r for h in heads for r in range(per_head)], device=tensor.device)
    return tensor.index_select(1, index)


def _attend_group(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention of new queries over one group's stored tokens, the new ones last.

    query: [B, h·rep, q, d] (query heads of the group's h KV heads); keys/values: [B, h, T, d];
    valid: [B, h, T] or None. The query heads sharing a KV head are folded into rows
    ([B, h, rep·q, d]), so K/V are never expanded. Returns [B, h·rep, q, d].
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    rep = q_heads // kv_heads
    folded = query.reshape(batch, kv_heads, rep * q_len, dim)
    mask = None
    if q_len > 1 or valid is not None:
        row_pos = torch.arange(total - q_len, total, device=keys.device)  # position of each new query
        key_pos = torch.arange(total, device=keys.device)
        causal = (key_pos[None, :] <= row_pos[:, None]).repeat(rep, 1)  # [rep·q, T]
        mask = causal[None, None]
        if valid is not None:
            # A query always sees itself, so a padding row cannot end up with nothing to attend to.
            itself = (key_pos[None, :] == row_pos[:, None]).repeat(rep, 1)
            mask = (mask & valid[:, :, None, :]) | itself[None, None]
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scaling)
    return out.reshape(batch, q_heads, q_len, dim)


def _group_heads(budgets: Sequence[int | None]) -> list[HeadGroup]:
    """One group per distinct budget, its KV heads ascending."""
    by_budget: dict[int | None, list[int]] = {}
    for head, budget in enumerate(budgets):
        if budget is not None and budget < 1:
            raise UncompError(f"KV head {head} has a budget of {budget} tokens; it must be at least 1")
        by_budget.setdefault(None if budget is None else int(budget), []).append(head)
    return [HeadGroup(heads, budget) for budget, heads in by_budget.items()]


class GroupedKVLayer(CacheLayerMixin):
    """One decoder layer's grouped cache. ``budgets[h]`` = tokens KV head ``h`` keeps (None = all).

    ``decode_evict``: keep every group at its budget while decoding, as the official code does:
    after each step, evict the stored tokens with the lowest SnapKV score. Our rolling score: the
    layer keeps its last ``window`` queries (a few KiB) and re-scores the stored tokens with them
    each step, pooled like at prefill; the last ``window`` tokens are never evicted. Without it,
    new tokens are appended and nothing is evicted.

    ``budget_allocator``: for budgets known only at prefill (AdaKV). It turns the prefill scores
    [B, H_kv, N] into the tokens each row and KV head keeps, int64 [B, H_kv]; the layer then
    re-forms its groups (heads storing as many tokens share a tensor; a row keeping fewer than
    its head stores marks the rest invalid). None: the fixed ``budgets``.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, budgets: Sequence[int | None], scorer: SnapKVScorer | None = None,
                 decode_evict: bool = False,
                 budget_allocator: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.budgets = list(budgets)
        self.groups = _group_heads(self.budgets)
        self.budget_allocator = budget_allocator
        self.num_kv_heads = len(budgets)
        self.scorer = scorer or SnapKVScorer()
        self.decode_evict = decode_evict
        self.seen = 0  # tokens this layer received
        self.skipped = 0  # prompt tokens pruned before reaching this layer (still seen by the model)
        self.prefill_tokens: int | None = None  # tokens this layer ran on at prefill (padding included)
        #: Set by the hidden-state pruner: keep the pruning score of the prefill for the next layer.
        self.want_prune_scores = False
        self.prune_scores: torch.Tensor | None = None  # [B, N] after prefill when wanted
        self._query_window: torch.Tensor | None = None  # [B, H_q, w, d], decode_evict only
        self._query_valid: torch.Tensor | None = None  # [B, w]
        self._awaiting_attention = False

    # -- transformers' layer contract ------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the new tokens and hand them to the attention function, which stores them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._awaiting_attention:
            raise UncompError(
                f"a grouped KV cache needs attention implementation {ATTN_IMPLEMENTATION!r}; "
                "run the model inside the policy's attach()"
            )
        self._awaiting_attention = True
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self) -> int:
        """Tokens seen (not stored): what the next position is counted from."""
        return self.seen + self.skipped

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """What the attention function sees: the longest group plus the new tokens."""
        stored = max(group.length() for group in self.groups)
        return stored + query_length, max(self.get_seq_length() - stored, 0)

    def get_max_length(self) -> int:
        """Evicting layers never hold more than their largest budget; appending ones grow."""
        budgets = [group.budget for group in self.groups]
        if self.decode_evict and None not in budgets:
            return max(budgets)
        return -1

    def reset(self) -> None:
        self.groups = _group_heads(self.budgets)  # empty, and as before any allocation
        self.seen = self.skipped = 0
        self.prefill_tokens = None
        self.prune_scores = self._query_window = self._query_valid = None
        self._awaiting_attention = False

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    # -- what it holds ---------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of stored K and V: Σ groups B × heads × kept tokens × head_dim × 2 × dtype size."""
        return sum(group.nbytes() for group in self.groups)

    def group_lengths(self) -> list[int]:
        """Stored tokens per group, in ``self.groups`` order."""
        return [group.length() for group in self.groups]

    # -- attention -------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attend the new tokens and store what each group keeps.

        query: [B, H_q, q, d]; keys/values: [B, H_kv, q, d] (new tokens, post-RoPE);
        valid: [B, q] bool or None (all real). Returns [B, q, H_q, d].
        """
        if not self._awaiting_attention:
            raise UncompError("the model ran without its grouped KV cache; pass cache= from attach()")
        self._awaiting_attention = False
        if valid is not None and bool(valid.all()):
            valid = None
        if self.groups[0].keys is None:
            out = self._prefill(query, keys, values, valid, scaling)
        else:
            out = self._decode(query, keys, values, valid, scaling)
        return out.transpose(1, 2).contiguous()

    def _prefill(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Full attention over the prompt, then keep each group's budget. Returns [B, H_q, N, d]."""
        batch, q_heads, n, dim = query.shape
        self.prefill_tokens = n
        mask = None
        if valid is not None:
            causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            itself = torch.eye(n, dtype=torch.bool, device=query.device)
            mask = (causal[None, None] & valid[:, None, None, :]) | itself[None, None]
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                             is_causal=mask is None and n > 1, scale=scaling,
                                             enable_gqa=q_heads != keys.shape[1])

        compress = any(g.budget is not None and g.budget < n for g in self.groups)
        scores = None
        if compress or self.want_prune_scores or self.decode_evict:
            rows = min(n, max(self.scorer.window, PRUNE_WINDOW if self.want_prune_scores else 0))
            query_valid = None if valid is None else valid[:, -rows:]
            probs = window_attention(query[:, :, -rows:], keys, valid, scaling, query_valid)
            if self.want_prune_scores:
                self.prune_scores = prune_scores(probs, self.scorer.window, self.scorer.kernel,
                                                 self.scorer.pooling, valid)
            if compress:
                scores = self.scorer.score_prefill(query, keys, valid, scaling, probs)
            if self.decode_evict:
                rows = min(n, self.scorer.window)
                self._query_window = query[:, :, -rows:].clone()
                self._query_valid = torch.ones(batch, rows, dtype=torch.bool, device=query.device) \
                    if valid is None else valid[:, -rows:].clone()

        if scores is not None and self.budget_allocator is not None:
            self._allocate(scores)
        row_valid = valid if valid is not None else torch.ones(batch, n, dtype=torch.bool, device=keys.device)
        for group in self.groups:
            group_valid = row_valid[:, None, :].expand(batch, len(group.heads), n)
            group_keys = _take_heads(keys, group.heads)
            group_values = _take_heads(values, group.heads)
            if group.budget is None or (group.budget >= n and group.row_budgets is None):
                group.store(group_keys.contiguous(), group_values.contiguous(), group_valid.contiguous())
                continue
            index, kept = group.keep_index(_take_heads(scores, group.heads), self.scorer.window)
            expanded = index[..., None].expand(-1, -1, -1, dim)
            group_valid = group_valid.gather(2, index)
            group.store(group_keys.gather(2, expanded), group_values.gather(2, expanded),
                        group_valid if kept is None else group_valid & kept)
        return out

    def _allocate(self, scores: torch.Tensor) -> None:
        """Re-form the groups from the tokens ``budget_allocator`` gives each row and KV head."""
        row_budgets = self.budget_allocator(scores)  # [B, H_kv]
        self.groups = _group_heads(row_budgets.amax(dim=0).tolist())  # stored length: the max over rows
        for group in self.groups:
            per_row = row_budgets[:, group.heads]
            if bool((per_row != group.budget).any()):
                group.row_budgets = per_row

    def _decode(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                valid: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Append the new tokens to every group and attend per group. Returns [B, H_q, q, d]."""
        batch, q_heads, q_len, _ = query.shape
        rep = q_heads // self.num_kv_heads
        new_valid = valid if valid is not None else \
            torch.ones(batch, q_len, dtype=torch.bool, device=keys.device)
        outputs = []
        for group in self.groups:
            heads = len(group.heads)
            group.keys = torch.cat([group.keys, _take_heads(keys, group.heads)], dim=2)
            group.values = torch.cat([group.values, _take_heads(values, group.heads)], dim=2)
            group.valid = torch.cat([group.valid, new_valid[:, None, :].expand(batch, heads, q_len)], dim=2)
            group.all_valid = group.all_valid and valid is None
            group_query = _take_heads(query, group.heads, rep)
            outputs.append(_attend_group(group_query, group.keys, group.values,
                                         None if group.all_valid else group.valid, scaling))
        out = outputs[0] if len(outputs) == 1 else self._merge_heads(outputs, rep)
        if self.decode_evict:
            self._evict(query, new_valid, scaling, rep)
        return out

    def _merge_heads(self, outputs: list[torch.Tensor], rep: int) -> torch.Tensor:
        """Per-group outputs [B, h·rep, q, d] back into query-head order [B, H_q, q, d]."""
        order = [h * rep + r for group in self.groups for h in group.heads for r in range(rep)]
        merged = torch.cat(outputs, dim=1)
        inverse = torch.empty(len(order), dtype=torch.long, device=merged.device)
        inverse[torch.tensor(order, device=merged.device)] = torch.arange(len(order), device=merged.device)
        return merged.index_select(1, inverse)

    def _evict(self, query: torch.Tensor, new_valid: torch.Tensor, scaling: float, rep: int) -> None:
        """Bring every group over budget back to it with the window score of the recent queries."""
        window = self.scorer.window
        self._query_window = torch.cat([self._query_window, query], dim=2)[:, :, -window:]
        self._query_valid = torch.cat([self._query_valid, new_valid], dim=1)[:, -window:]
        for group in self.groups:
            if group.budget is None or group.length() <= group.budget:
                continue
            # The last `rows` stored tokens are the last `rows` tokens seen (always kept), so the
            # window queries line up with them for the causal rule.
            least = group.budget if group.row_budgets is None else int(group.row_budgets.min())
            rows = min(window, least, self._query_window.shape[2])
            group_query = _take_heads(self._query_window, group.heads, rep)[:, :, -rows:]
            valid = None if group.all_valid else group.valid
            probs = window_attention(group_query, group.keys, valid, scaling, self._query_valid[:, -rows:])
            scores = self.scorer.score(probs, valid, len(group.heads))
            group.take(*group.keep_index(scores, rows))

    # -- helpers ---------------------------------------------------------------------------------

    def _map_batch(self, fn) -> None:
        for group in self.groups:
            if group.keys is not None:
                group.keys, group.values, group.valid = fn(group.keys), fn(group.values), fn(group.valid)
            if group.row_budgets is not None:
                group.row_budgets = fn(group.row_budgets)
        if self._query_window is not None:
            self._query_window, self._query_valid = fn(self._query_window), fn(self._query_valid)

    def _move(self, device) -> None:
        self._map_batch(lambda t: t.to(device, non_blocking=True))


class GroupedKVCache(Cache):
    """One :class:`GroupedKVLayer` per decoder layer (transformers ``Cache`` API).

    ``stats``: what the policy resolved for this run (budgets in tokens, notes), reported with the
    run's results; the cache is per run, so the policy that made it stays unchanged.
    """

    def __init__(self, layers: Sequence[GroupedKVLayer], stats: dict | None = None):
        super().__init__(layers=list(layers))
        self.stats = dict(stats or {})

    @classmethod
    def from_budgets(cls, kv_head_budgets: Sequence[Sequence[int | None]] | torch.Tensor,
                     scorer: SnapKVScorer | None = None, decode_evict: bool = False,
                     stats: dict | None = None) -> GroupedKVCache:
        """``kv_head_budgets``: [L, H_kv] tokens per KV head (None = keep all)."""
        rows = kv_head_budgets.tolist() if isinstance(kv_head_budgets, torch.Tensor) else kv_head_budgets
        return cls([GroupedKVLayer(row, scorer, decode_evict) for row in rows], stats)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def prefill_tokens_per_layer(self) -> list[int | None]:
        """Tokens each layer ran on at prefill: fewer in later layers under hidden-state pruning."""
        return [layer.prefill_tokens for layer in self.layers]


def cache_nbytes(cache: Cache) -> int:
    """Bytes of K/V a cache holds now: grouped layers report their own, dense layers their tensors."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, GroupedKVLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total
