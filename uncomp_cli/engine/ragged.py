"""Rows that each own their cache and decode together: the storage behind continuous batching.

A server's rows differ in method, budget and length, per row, layer and KV head. Rather than pad
them into one tensor per step (copying every row's cache each step) or page them, each row keeps
the :class:`~uncomp_cli.engine.cache.GroupedKVCache` its own plan built — exactly what it holds
alone — and a decode step runs the model once over all rows: projections, MLPs and the LM head
batched, attention per row over that row's own groups (:class:`RowsCache`). A row joins after its
own prefill and leaves at any step; nothing is copied when either happens. The price is one small
attention call per row and layer instead of one per layer, measured in docs/results.md.

The full cache takes part as a grouped cache that keeps every token (``CachePlan.keep_all``): equal
to transformers' ``DynamicCache`` token for token (tests/unit/test_ragged.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from uncomp_cli.engine.attention import use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.steps import Row, forward_last, pick_tokens
from uncomp_cli.errors import UncompError


class RowsLayer(CacheLayerMixin):
    """Layer ``index`` of every row's cache, seen by the model as one layer of a batch."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, rows: RowsCache, index: int):
        super().__init__()
        self.rows, self.index = rows, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def _layers(self):
        return [cache.layers[self.index] for cache in self.rows.caches]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Each row's layer counts its new token (key_states: [B, H_kv, q, d])."""
        for row, layer in enumerate(self._layers()):
            layer.update(key_states[row:row + 1], value_states[row:row + 1])
        return key_states, value_states

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None,
               scaling: float, positions: torch.Tensor | None = None, sliding_window: int | None = None,
               softcap: float | None = None) -> torch.Tensor:
        """Each row attends over its own cache. query: [B, H_q, q, d] -> [B, q, H_q, d]."""
        outputs = []
        for row, layer in enumerate(self._layers()):
            outputs.append(layer.attend(query[row:row + 1], keys[row:row + 1], values[row:row + 1],
                                        None if valid is None else valid[row:row + 1], scaling,
                                        None if positions is None else positions[row:row + 1],
                                        sliding_window=sliding_window, softcap=softcap))
        return torch.cat(outputs, dim=0)

    def get_seq_length(self) -> int:
        return max((layer.get_seq_length() for layer in self._layers()), default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        sizes = [layer.get_mask_sizes(query_length) for layer in self._layers()]
        return max((s[0] for s in sizes), default=query_length), 0

    def get_max_length(self) -> int:
        return -1


class RowsCache(Cache):
    """The caches of the rows decoding together, row ``i`` being batch index ``i`` of a step."""

    def __init__(self, caches: Sequence[GroupedKVCache], num_layers: int):
        self.caches = list(caches)
        super().__init__(layers=[RowsLayer(self, index) for index in range(num_layers)])


@dataclass
class RaggedRow:
    """A row that has its own cache: where it is and what it feeds next."""

    row: Row
    cache: GroupedKVCache
    next_position: int
    last: int  # the latest token, fed by the next step


class RaggedBatch:
    """Rows of any methods, budgets and lengths decoding together: :meth:`join` after a row's own
    prefill, :meth:`step` for all, :meth:`remove` at any step."""

    def __init__(self, model):
        self.model = model
        self.rows: list[RaggedRow] = []
        self.logits: torch.Tensor | None = None  # [B, V] of the last step, for log-probabilities

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, row: Row, cache: GroupedKVCache, next_position: int, first_token: int) -> None:
        """A row whose prompt is in ``cache`` (next position ``next_position``) and whose first
        token, not yet fed, is ``first_token``."""
        if not isinstance(cache, GroupedKVCache):
            raise UncompError("a row joins a ragged batch with a grouped cache (CachePlan.keep_all for the full one)")
        self.rows.append(RaggedRow(row, cache, next_position, first_token))

    def remove(self, indices: Sequence[int]) -> None:
        gone = set(indices)
        self.rows = [r for i, r in enumerate(self.rows) if i not in gone]

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed every row's latest token at its own position; pick each row's next token -> [B]."""
        if not self.rows:
            raise UncompError("step() needs at least one row")
        device = self.rows[0].cache.layers[0].device
        tokens = torch.tensor([[r.last] for r in self.rows], device=device)
        positions = torch.tensor([[r.next_position] for r in self.rows], device=device)
        cache = RowsCache([r.cache for r in self.rows], len(self.rows[0].cache.layers))
        with use_grouped_cache(self.model, cache):
            logits = forward_last(self.model, tokens, None, positions, cache)
        self.logits = logits
        if all(r.row.settings.temperature == 0 for r in self.rows):
            picked = logits.argmax(dim=-1)
        else:
            picked = torch.stack([pick_tokens(logits[i:i + 1], r.row.settings, r.row.generator)[0]
                                  for i, r in enumerate(self.rows)])
        for r, token in zip(self.rows, picked.tolist()):
            r.next_position += 1
            r.last = token
        return picked
