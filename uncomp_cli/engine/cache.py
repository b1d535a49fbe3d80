"""A KV cache that keeps a different number of tokens per group of KV heads, with real savings.

Layout (DuoAttention's, no custom kernels): per layer, the KV heads that share a budget form a
group (:mod:`uncomp_cli.engine.groups`) stored as one dense tensor for K and one for V, per **KV
head** (never repeated per query head), holding only the kept tokens and their per-row validity:
transformers builds one mask per forward, sized for one length, which cannot describe groups of
different lengths or non-contiguous kept positions. So attention runs in the function registered
as ``"uncomp"`` (:mod:`uncomp_cli.engine.attention`): ``update`` only counts tokens, and the layer
attends per group with its own validity and a causal rule. At prefill (the first forward a layer
sees) it attends with full K/V, scores the tokens with the last ``window`` queries and stores only
the selected ones, so at most one layer's full K/V exists at a time. What a layer does is fixed
by its :class:`~uncomp_cli.engine.plan.LayerPlan`.

``get_seq_length()`` counts tokens *seen* (positions never come from stored lengths); callers pass
explicit ``position_ids`` (:mod:`uncomp_cli.engine.steps` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from uncomp_cli.engine.attend import attend_group, causal_attention, rule_attention
from uncomp_cli.engine.attention import ATTN_IMPLEMENTATION
from uncomp_cli.engine.groups import group_heads, group_rows, merge_heads, slide_window, take_heads, visible_tail
from uncomp_cli.engine.layer_state import LayerState
from uncomp_cli.engine.plan import CachePlan, LayerPlan
from uncomp_cli.engine.recording import attend_and_record
from uncomp_cli.engine.selection import PRUNE_WINDOW, prune_scores, window_attention
from uncomp_cli.errors import UncompError


class GroupedKVLayer(LayerState, CacheLayerMixin):
    """One decoder layer's grouped cache, built from its :class:`~uncomp_cli.engine.plan.LayerPlan`.

    ``decode_evict``: keep every group at its budget while decoding, as the official code does:
    after each step, evict the stored tokens with the lowest SnapKV score. Our rolling score: the
    layer keeps its last ``window`` queries (a few KiB) and re-scores the stored tokens with them
    each step, pooled like at prefill; the last ``window`` tokens are never evicted. Without it,
    new tokens are appended and nothing is evicted.

    An ``allocator`` (AdaKV) turns the prefill scores into the tokens each row and KV head keeps;
    the layer then re-forms its groups (heads storing as many tokens share a tensor; a row keeping
    fewer than its head stores marks the rest invalid). Otherwise the plan's fixed budgets.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        self.budgets = list(plan.budgets)  # what each KV head keeps (select() may set them anew)
        self.groups = group_heads(self.budgets)
        self.num_kv_heads = len(self.budgets)
        self.scorer = plan.scorer
        self.decode_evict = plan.decode_evict
        self.seen = 0  # tokens this layer received
        self.skipped = 0  # prompt tokens pruned before reaching this layer (still seen by the model)
        self.prefill_tokens: int | None = None  # tokens this layer ran on at prefill (padding included)
        self._deferred = plan.defer_selection  # every token kept in one group until select()
        #: While deferred: the last ``window`` queries seen [B, H_q, w, d] and their validity [B, w],
        #: so a prompt fed in chunks is scored as a one-piece prefill would be (:meth:`select_by_window`).
        self._window_queries: torch.Tensor | None = None
        self._window_valid: torch.Tensor | None = None
        self._scaling = 1.0
        #: [B, H_kv, N]: while set, the most attention any new query (of any of a KV head's query
        #: heads) paid each of the N tokens held before; a later pass's verdict on them.
        self.recorded: torch.Tensor | None = None
        self._prune_scores: torch.Tensor | None = None  # [B, N] after prefill, when the plan asks
        self._query_window: torch.Tensor | None = None  # [B, H_q, w, d], decode_evict only
        self._query_valid: torch.Tensor | None = None  # [B, w]
        self._awaiting_attention = False
        #: Set by each call from the attention module: a sliding window (the layer keeps nothing older)
        #: and soft-capping; either one moves attention from SDPA to :func:`rule_attention`.
        self.sliding_window: int | None = None
        self.softcap: float | None = None

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
        self._prune_scores = self._query_window = self._query_valid = None
        self._deferred = self.plan.defer_selection
        self._window_queries = self._window_valid = None
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
        self._scaling = scaling
        if valid is not None and bool(valid.all()):
            valid = None
        if not self.groups[0].holds_tokens():
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

        if self._deferred:  # one group of every head, holding every token, until select() is called
            self.groups = group_heads([None] * self.num_kv_heads)
            self._remember_window(query, valid)
        compress = any(g.budget is not None and g.budget < n for g in self.groups)
        scores = None
        prune_heads = self.plan.prune_heads
        if compress or prune_heads is not None or self.decode_evict:
            rows = min(n, max(self.scorer.window, PRUNE_WINDOW if prune_heads is not None else 0))
            query_valid = None if valid is None else valid[:, -rows:]
            probs = window_attention(query[:, :, -rows:], keys, valid, scaling, query_valid)
            if prune_heads is not None:
                self._prune_scores = prune_scores(probs, self.scorer.window, self.scorer.kernel,
                                                  self.scorer.pooling, valid, prune_heads)
            if compress:
                scores = self.scorer.score_prefill(query, keys, valid, scaling, probs)
            if self.decode_evict:
                rows = min(n, self.scorer.window)
                self._query_window = query[:, :, -rows:].clone()
                self._query_valid = torch.ones(batch, rows, dtype=torch.bool, device=query.device) \
                    if valid is None else valid[:, -rows:].clone()

        row_valid = valid if valid is not None else torch.ones(batch, n, dtype=torch.bool, device=keys.device)
        if self.sliding_window is not None:  # only what a later query can still see
            keys, values, row_valid, token_positions, scores = visible_tail(keys, values, row_valid, token_positions,
                                                                            scores, self.sliding_window)
        self._keep(keys, values, row_valid, token_positions, scores, self.scorer.window)
        return out

    def _keep(self, keys: torch.Tensor, values: torch.Tensor, row_valid: torch.Tensor, positions: torch.Tensor,
              scores: torch.Tensor | None, window: int, allocate: bool = True) -> None:
        """Store in each group what its budget keeps of ``keys``/``values`` [B, H_kv, N, d] (tokens at
        ``positions`` [B, N]) by ``scores`` [B, H_kv, N] (None: nothing is dropped); the last
        ``window`` tokens are always kept. ``allocate``: let the plan's allocator set the budgets."""
        batch, _, n, dim = keys.shape
        if scores is not None and allocate and self.plan.allocator is not None:
            self.groups = group_rows(self.plan.allocator(scores))  # AdaKV: budgets known only now
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

    # -- what other parts of the engine ask of a layer ------------------------------------------

    def take_prune_scores(self) -> torch.Tensor | None:
        """The pruning score [B, N] of the last prefill (once; then None), if the plan asked for it."""
        scores, self._prune_scores = self._prune_scores, None
        return scores

    def record_skipped(self, tokens: int) -> None:
        """``tokens`` prompt tokens were pruned before this layer: they count as seen for positions."""
        self.skipped = tokens

    def holds_whole_context(self) -> bool:
        """Whether the layer holds every token of a prefill whose selection is deferred, nothing added."""
        return self._deferred and len(self.groups) == 1 and self.groups[0].holds_tokens()

    def start_recording(self) -> None:
        """From now on, record in :attr:`recorded` how new queries attend to the tokens held."""
        if not self.holds_whole_context():
            raise UncompError("recording needs a layer prefilled with its selection deferred")
        self.recorded = torch.zeros(self.groups[0].keys.shape[:3], dtype=torch.float32,
                                    device=self.groups[0].keys.device)

    def select(self, scores: torch.Tensor, window: int, budgets: Sequence[int] | None = None) -> None:
        """Keep the budgets now, by ``scores`` [B, H_kv, N] over the N tokens held since a prefill
        with its selection deferred (a context scored by how a later pass attends to it).
        ``budgets``: tokens per KV head decided elsewhere (then they replace the layer's, and no
        allocator runs)."""
        if not self.holds_whole_context() or self.groups[0].length() != scores.shape[-1]:
            raise UncompError("select() needs a layer prefilled with its selection deferred and nothing added since")
        whole = self.groups[0]
        self._deferred = False
        if budgets is not None:
            self.budgets = list(budgets)
        self.groups = group_heads(self.budgets)
        self._keep(whole.keys, whole.values, whole.valid[:, 0], whole.positions[:, 0], scores, window,
                   allocate=budgets is None)

    def quantise(self, bits: int) -> None:
        """Hold every group's keys and values rounded to ``bits`` bits from now on
        (:mod:`uncomp_cli.engine.quantise`): a compressed context's, once its selection is made."""
        for group in self.groups:
            group.quantise(bits)

    def adopt(self, whole: GroupedKVLayer) -> None:
        """Take over the whole context another policy's layer holds after a deferred prefill (one
        re-reading shared by several policies), keeping this layer's plan; :meth:`select` follows."""
        if not whole.holds_whole_context():
            raise UncompError("adopt() needs a layer prefilled with its selection deferred and nothing added since")
        self.device, self.dtype, self.is_initialized = whole.device, whole.dtype, True
        self.seen, self.skipped, self.prefill_tokens = whole.seen, whole.skipped, whole.prefill_tokens
        self.sliding_window, self.softcap, self._scaling = whole.sliding_window, whole.softcap, whole._scaling
        self._window_queries, self._window_valid = whole._window_queries, whole._window_valid
        self._deferred = True
        self.groups = [whole.groups[0].snapshot()]

    def select_by_window(self) -> None:
        """End a prefill fed in chunks (a deferred plan): score the tokens held with the last
        ``window`` queries, as a one-piece prefill scores them, and keep the budgets. Window scorers
        only: one that needs every prompt query (H2O) takes its prompt in one piece."""
        if not self.holds_whole_context() or self._window_queries is None:
            raise UncompError("select_by_window() needs a layer fed with its selection deferred")
        if self.scorer.needs_all_queries:
            raise UncompError(f"{type(self.scorer).__name__} scores with every prompt query: prefill in one piece")
        whole = self.groups[0]
        valid = None if whole.all_valid else whole.valid[:, 0]
        probs = window_attention(self._window_queries, whole.keys, valid, self._scaling, self._window_valid)
        if self.decode_evict:
            self._query_window, self._query_valid = self._window_queries, self._window_valid
        self._window_queries = self._window_valid = None
        self.select(self.scorer.score(probs, valid, self.num_kv_heads), self.scorer.window)

    def _remember_window(self, query: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Keep the last ``window`` queries (and their validity) of what was fed while deferred."""
        batch, _, count, _ = query.shape
        new_valid = torch.ones(batch, count, dtype=torch.bool, device=query.device) if valid is None else valid
        if self._window_queries is not None:
            query = torch.cat([self._window_queries, query], dim=2)
            new_valid = torch.cat([self._window_valid, new_valid], dim=1)
        window = self.scorer.window
        self._window_queries, self._window_valid = query[:, :, -window:].clone(), new_valid[:, -window:].clone()

    def _decode(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                valid: torch.Tensor | None, scaling: float, positions: torch.Tensor | None) -> torch.Tensor:
        """Append the new tokens to every group and attend per group. Returns [B, H_q, q, d]."""
        batch, q_heads, q_len, _ = query.shape
        rep = q_heads // self.num_kv_heads
        new_valid = valid if valid is not None else \
            torch.ones(batch, q_len, dtype=torch.bool, device=keys.device)
        new_positions = self._positions(positions, batch, q_len, keys.device)
        if self._deferred:  # a prompt fed in chunks (or a re-reading): keep the latest window
            self._remember_window(query, new_valid)
        outputs = []
        for group in self.groups:
            heads = len(group.heads)
            group.append(take_heads(keys, group.heads), take_heads(values, group.heads),
                         new_valid[:, None, :].expand(batch, heads, q_len),
                         new_positions[:, None, :].expand(batch, heads, q_len), valid is None)
            group_query = take_heads(query, group.heads, rep)
            group_valid = None if group.all_valid else group.valid
            if self.recorded is not None:  # one group of every head: also how much the queries paid each token
                out, seen = attend_and_record(group_query, group, new_positions, valid, scaling,
                                              self.recorded.shape[-1], self.sliding_window, self.softcap)
                outputs.append(out)
                self.recorded = torch.maximum(self.recorded, seen)
            elif self.sliding_window is None and self.softcap is None:
                outputs.append(attend_group(group_query, group.keys, group.values, group_valid, scaling))
            else:
                outputs.append(rule_attention(group_query, group.keys, group.values, new_positions, group.positions,
                                              group_valid, scaling, self.sliding_window, self.softcap))
        out = outputs[0] if len(outputs) == 1 else merge_heads(outputs, self.groups, rep)
        if self.decode_evict:
            self._evict(query, new_valid, scaling, rep)
        if self.sliding_window is not None:
            slide_window(self.groups, new_positions, self.sliding_window)
        return out

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
    """One :class:`GroupedKVLayer` per decoder layer (transformers ``Cache`` API), built from a plan.

    ``stats``: what the policy resolved for this run (budgets in tokens, notes), reported with the
    run's results; the cache is per run, so the policy that made it stays unchanged.
    """

    def __init__(self, plan: CachePlan, layers: Sequence[GroupedKVLayer] | None = None):
        """``layers``: ones already holding a state (:meth:`GroupedKVLayer.restore`); else empty ones."""
        layers = [GroupedKVLayer(layer) for layer in plan.layers] if layers is None else list(layers)
        if len(layers) != len(plan.layers):
            raise UncompError(f"the plan has {len(plan.layers)} layers, the cache {len(layers)}")
        super().__init__(layers=layers)
        self.plan = plan
        self.stats = dict(plan.stats)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def reserved_nbytes(self) -> int:
        return sum(layer.reserved_nbytes() for layer in self.layers)

    def keeps(self, tokens: int) -> bool:
        """Whether a prefill of ``tokens`` tokens keeps every one of them (so it may come in chunks)."""
        return self.plan.prune is None and all(
            layer.defer_selection or all(b is None or b >= tokens for b in layer.budgets) for layer in self.plan.layers)

    def select_by_window(self) -> None:
        """End a prefill fed in chunks into a deferred plan: every layer keeps what a one-piece
        prefill would have kept (:meth:`GroupedKVLayer.select_by_window`)."""
        for layer in self.layers:
            layer.select_by_window()

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
