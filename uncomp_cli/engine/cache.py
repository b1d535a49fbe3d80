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
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from uncomp_cli.engine.attend import attend_group, causal_attention, rule_attention
from uncomp_cli.engine.attention import ATTN_IMPLEMENTATION
from uncomp_cli.engine.groups import group_heads, take_heads
from uncomp_cli.engine.selection import PRUNE_WINDOW, SnapKVScorer, prune_scores, window_attention
from uncomp_cli.errors import UncompError


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
        self.groups = group_heads(self.budgets)
        self.budget_allocator = budget_allocator
        self.num_kv_heads = len(budgets)
        self.scorer = scorer or SnapKVScorer()
        self.decode_evict = decode_evict
        self.seen = 0  # tokens this layer received
        self.skipped = 0  # prompt tokens pruned before reaching this layer (still seen by the model)
        self.prefill_tokens: int | None = None  # tokens this layer ran on at prefill (padding included)
        #: Keep every token at prefill in one group, and the budgets only when select() is called.
        self.select_later = False
        #: [B, H_kv, N]: while set, the most attention any new query (of any of a KV head's query
        #: heads) paid each of the N tokens held before; a later pass's verdict on them.
        self.recorded: torch.Tensor | None = None
        #: Set by the hidden-state pruner: keep the pruning score of the prefill for the next layer.
        self.want_prune_scores = False
        self.prune_heads = "sum"  # how those scores combine the heads (selection.prune_scores)
        self.prune_scores: torch.Tensor | None = None  # [B, N] after prefill when wanted
        self._query_window: torch.Tensor | None = None  # [B, H_q, w, d], decode_evict only
        self._query_valid: torch.Tensor | None = None  # [B, w]
        self._awaiting_attention = False
        #: What the model's attention module asks of this layer (set by each call): a sliding window
        #: (a query sees the last W positions; the layer keeps no token older than that) and
        #: attention soft-capping. Either one moves attention from SDPA to :func:`rule_attention`.
        self.sliding_window: int | None = None
        self.softcap: float | None = None
        self._merge: tuple | None = None  # (grouping, query-head order) for _merge_heads

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
        self.groups = group_heads(self.budgets)  # empty, and as before any allocation
        self.seen = self.skipped = 0
        self.prefill_tokens = None
        self.recorded = None
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

    def reserved_nbytes(self) -> int:
        """Bytes of the groups' buffers: :meth:`nbytes` plus the slack decoding writes into."""
        return sum(group.reserved_nbytes() for group in self.groups)

    def group_lengths(self) -> list[int]:
        """Stored tokens per group, in ``self.groups`` order."""
        return [group.length() for group in self.groups]

    # -- attention -------------------------------------------------------------------------------

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               valid: torch.Tensor | None, scaling: float, positions: torch.Tensor | None = None,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Attend the new tokens and store what each group keeps.

        query: [B, H_q, q, d]; keys/values: [B, H_kv, q, d] (new tokens, post-RoPE);
        valid: [B, q] bool or None (all real); positions: [B, q] or [1, q] original positions of
        the new tokens (None: the next ones after what the layer has seen); ``sliding_window``,
        ``softcap``: the attention module's, as transformers passes them. Returns [B, q, H_q, d].
        """
        if not self._awaiting_attention:
            raise UncompError("the model ran without its grouped KV cache; pass cache= from attach()")
        self._awaiting_attention = False
        self.sliding_window, self.softcap = sliding_window, softcap
        if valid is not None and bool(valid.all()):
            valid = None
        if self.groups[0].keys is None:
            out = self._prefill(query, keys, values, valid, scaling, positions)
        else:
            out = self._decode(query, keys, values, valid, scaling, positions)
        return out.transpose(1, 2).contiguous()

    def _positions(self, positions: torch.Tensor | None, batch: int, count: int, device) -> torch.Tensor:
        """[B, count] int64 positions of the new tokens."""
        if positions is None:
            seen = self.get_seq_length()  # update() has counted the new tokens already
            positions = torch.arange(seen - count, seen, device=device)[None]
        return positions.to(device=device, dtype=torch.long).expand(batch, count)

    def _prefill(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 valid: torch.Tensor | None, scaling: float, positions: torch.Tensor | None) -> torch.Tensor:
        """Full attention over the prompt, then keep each group's budget. Returns [B, H_q, N, d]."""
        batch, q_heads, n, dim = query.shape
        self.prefill_tokens = n
        token_positions = self._positions(positions, batch, n, keys.device)
        if self.sliding_window is None and self.softcap is None:
            out = causal_attention(query, keys, values, valid, scaling)
        else:
            per_head = (batch, keys.shape[1], n)
            out = rule_attention(query, keys, values, token_positions, token_positions[:, None].expand(per_head),
                                 None if valid is None else valid[:, None].expand(per_head), scaling,
                                 self.sliding_window, self.softcap)

        if self.select_later:  # one group of every head, holding every token, until select() is called
            self.groups = group_heads([None] * self.num_kv_heads)
        compress = any(g.budget is not None and g.budget < n for g in self.groups)
        scores = None
        if compress or self.want_prune_scores or self.decode_evict:
            rows = min(n, max(self.scorer.window, PRUNE_WINDOW if self.want_prune_scores else 0))
            query_valid = None if valid is None else valid[:, -rows:]
            probs = window_attention(query[:, :, -rows:], keys, valid, scaling, query_valid)
            if self.want_prune_scores:
                self.prune_scores = prune_scores(probs, self.scorer.window, self.scorer.kernel,
                                                 self.scorer.pooling, valid, self.prune_heads)
            if compress:
                scores = self.scorer.score_prefill(query, keys, valid, scaling, probs)
            if self.decode_evict:
                rows = min(n, self.scorer.window)
                self._query_window = query[:, :, -rows:].clone()
                self._query_valid = torch.ones(batch, rows, dtype=torch.bool, device=query.device) \
                    if valid is None else valid[:, -rows:].clone()

        row_valid = valid if valid is not None else torch.ones(batch, n, dtype=torch.bool, device=keys.device)
        if self.sliding_window is not None:  # only what a later query can still see
            keys, values, row_valid, token_positions, scores = self._in_window(keys, values, row_valid,
                                                                               token_positions, scores)
        self._keep(keys, values, row_valid, token_positions, scores, self.scorer.window)
        return out

    def _in_window(self, keys, values, row_valid, positions, scores):
        """The prompt's tokens that the next query can see (the last W − 1 positions of each row):
        they are the last columns of every row, the most of them kept, older ones in those columns
        marked invalid."""
        last = positions.masked_fill(~row_valid, -1).amax(-1, keepdim=True)
        visible = row_valid & (positions >= last + 2 - self.sliding_window)
        tail = max(int(visible.sum(-1).max()), 1)
        visible = visible[:, -tail:]
        if scores is not None:  # an older token in these columns is never chosen over a visible one
            scores = scores[..., -tail:].masked_fill(~visible[:, None, :], float("-inf"))
        return keys[:, :, -tail:], values[:, :, -tail:], visible, positions[:, -tail:], scores

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, row_valid: torch.Tensor, positions: torch.Tensor,
              scores: torch.Tensor | None, window: int) -> None:
        """Store in each group what its budget keeps of ``keys``/``values`` [B, H_kv, N, d] (tokens at
        ``positions`` [B, N]) by ``scores`` [B, H_kv, N] (None: nothing is dropped); the last
        ``window`` tokens are always kept."""
        batch, _, n, dim = keys.shape
        if scores is not None and self.budget_allocator is not None:
            self._allocate(scores)
        for group in self.groups:
            group_valid = row_valid[:, None, :].expand(batch, len(group.heads), n)
            group_positions = positions[:, None, :].expand(batch, len(group.heads), n)
            group_keys = take_heads(keys, group.heads)
            group_values = take_heads(values, group.heads)
            if group.budget is None or (group.budget >= n and group.row_budgets is None):
                group.store(group_keys.contiguous(), group_values.contiguous(), group_valid.contiguous(),
                            group_positions.contiguous())
                continue
            index, kept = group.keep_index(take_heads(scores, group.heads), window)
            expanded = index[..., None].expand(-1, -1, -1, dim)
            group_valid = group_valid.gather(2, index)
            group.store(group_keys.gather(2, expanded), group_values.gather(2, expanded),
                        group_valid if kept is None else group_valid & kept, group_positions.gather(2, index))

    def start_recording(self) -> None:
        """From now on, record in :attr:`recorded` how new queries attend to the tokens held."""
        if not self.select_later or self.groups[0].keys is None:
            raise UncompError("recording needs a layer prefilled with select_later")
        self.recorded = torch.zeros(self.groups[0].keys.shape[:3], dtype=torch.float32,
                                    device=self.groups[0].keys.device)

    def select(self, scores: torch.Tensor, window: int, budgets: Sequence[int] | None = None) -> None:
        """Keep the budgets now, by ``scores`` [B, H_kv, N] over the N tokens held since a prefill
        with ``select_later`` (a context scored by how a later pass attends to it). ``budgets``:
        tokens per KV head decided elsewhere (then they replace the layer's, and no allocator runs)."""
        whole = self.groups[0]
        if not self.select_later or len(self.groups) != 1 or whole.length() != scores.shape[-1]:
            raise UncompError("select() needs a layer prefilled with select_later and nothing added since")
        self.select_later = False
        if budgets is not None:
            self.budgets, self.budget_allocator = list(budgets), None
        self.groups = group_heads(self.budgets)
        self._keep(whole.keys, whole.values, whole.valid[:, 0], whole.positions[:, 0], scores, window)

    def adopt(self, whole: GroupedKVLayer) -> None:
        """Take over the whole context another policy's layer holds after a prefill with
        ``select_later`` (one re-reading shared by several policies), keeping this layer's budgets,
        scorer and eviction; :meth:`select` follows."""
        if not whole.select_later or len(whole.groups) != 1 or whole.groups[0].keys is None:
            raise UncompError("adopt() needs a layer prefilled with select_later and nothing added since")
        self.device, self.dtype, self.is_initialized = whole.device, whole.dtype, True
        self.seen, self.skipped, self.prefill_tokens = whole.seen, whole.skipped, whole.prefill_tokens
        self.sliding_window, self.softcap = whole.sliding_window, whole.softcap
        self.select_later = True
        self.groups = [whole.groups[0].snapshot()]

    def _allocate(self, scores: torch.Tensor) -> None:
        """Re-form the groups from the tokens ``budget_allocator`` gives each row and KV head."""
        row_budgets = self.budget_allocator(scores)  # [B, H_kv]
        self.groups = group_heads(row_budgets.amax(dim=0).tolist())  # stored length: the max over rows
        for group in self.groups:
            per_row = row_budgets[:, group.heads]
            if bool((per_row != group.budget).any()):
                group.row_budgets = per_row

    def _decode(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                valid: torch.Tensor | None, scaling: float, positions: torch.Tensor | None) -> torch.Tensor:
        """Append the new tokens to every group and attend per group. Returns [B, H_q, q, d]."""
        batch, q_heads, q_len, _ = query.shape
        rep = q_heads // self.num_kv_heads
        new_valid = valid if valid is not None else \
            torch.ones(batch, q_len, dtype=torch.bool, device=keys.device)
        new_positions = self._positions(positions, batch, q_len, keys.device)
        outputs = []
        for group in self.groups:
            heads = len(group.heads)
            group.append(take_heads(keys, group.heads), take_heads(values, group.heads),
                         new_valid[:, None, :].expand(batch, heads, q_len),
                         new_positions[:, None, :].expand(batch, heads, q_len), valid is None)
            group_query = take_heads(query, group.heads, rep)
            group_valid = None if group.all_valid else group.valid
            if self.sliding_window is None and self.softcap is None:
                outputs.append(attend_group(group_query, group.keys, group.values, group_valid, scaling))
            else:
                outputs.append(rule_attention(group_query, group.keys, group.values, new_positions, group.positions,
                                              group_valid, scaling, self.sliding_window, self.softcap))
        if self.recorded is not None:  # how much the new queries attend to each token held before them
            probs = window_attention(query, self.groups[0].keys, None if self.groups[0].all_valid
                                     else self.groups[0].valid, scaling, new_valid)
            seen = probs[..., : self.recorded.shape[-1]].reshape(batch, self.num_kv_heads, -1, self.recorded.shape[-1])
            self.recorded = torch.maximum(self.recorded, seen.amax(dim=2))
        out = outputs[0] if len(outputs) == 1 else self._merge_heads(outputs, rep)
        if self.decode_evict:
            self._evict(query, new_valid, scaling, rep)
        if self.sliding_window is not None:
            self._slide(new_positions)
        return out

    def _slide(self, new_positions: torch.Tensor) -> None:
        """Drop what left the sliding window: tokens the next query (one past ``new_positions`` [B, q])
        cannot see are marked invalid, and the leading columns no row can see are freed."""
        threshold = new_positions.amax(-1) + 2 - self.sliding_window  # [B]
        for group in self.groups:
            valid = group.valid & (group.positions >= threshold[:, None, None])
            seen = valid.flatten(0, 1).any(0)
            first = int(seen.int().argmax()) if bool(seen.any()) else valid.shape[-1]
            group.store(group.keys[:, :, first:], group.values[:, :, first:], valid[..., first:],
                        group.positions[..., first:])

    def _merge_heads(self, outputs: list[torch.Tensor], rep: int) -> torch.Tensor:
        """Per-group outputs [B, h·rep, q, d] back into query-head order [B, H_q, q, d]."""
        merged = torch.cat(outputs, dim=1)
        heads = tuple(h for group in self.groups for h in group.heads)
        if self._merge is None or self._merge[0] != (heads, rep, merged.device):  # once per grouping
            order = torch.tensor([h * rep + r for h in heads for r in range(rep)], device=merged.device)
            self._merge = ((heads, rep, merged.device), order.argsort())
        return merged.index_select(1, self._merge[1])

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
            group_query = take_heads(self._query_window, group.heads, rep)[:, :, -rows:]
            valid = None if group.all_valid else group.valid
            probs = window_attention(group_query, group.keys, valid, scaling, self._query_valid[:, -rows:])
            scores = self.scorer.score(probs, valid, len(group.heads))
            group.take(*group.keep_index(scores, rows))

    # -- helpers ---------------------------------------------------------------------------------

    def _map_batch(self, fn) -> None:
        for group in self.groups:
            group.map_batch(fn)
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

    def reserved_nbytes(self) -> int:
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def prefill_tokens_per_layer(self) -> list[int | None]:
        """Tokens each layer ran on at prefill: fewer in later layers under hidden-state pruning."""
        return [layer.prefill_tokens for layer in self.layers]


def cache_nbytes(cache: Cache, reserved: bool = False) -> int:
    """Bytes of K/V a cache holds now: grouped layers report their own (``reserved``: their buffers,
    slack included), dense layers their tensors."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, GroupedKVLayer):
            total += layer.reserved_nbytes() if reserved else layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.numel() * layer.keys.element_size()
            total += layer.values.numel() * layer.values.element_size()
    return total
