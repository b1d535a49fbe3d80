"""The KV heads of a layer that share a budget: their stored tokens and selection (their attention:
:mod:`uncomp_cli.engine.attend`).

A group stores one dense tensor for K and one for V, ``[B, heads_in_group, T_group, head_dim]``
(or, for a compressed context held at 8 bits, their codes with per-token steps:
:mod:`uncomp_cli.engine.quantise`), holding only its kept tokens, per **KV head** (never repeated
per query head), with the per-row validity of each stored token. Used by
:class:`~uncomp_cli.engine.cache.GroupedKVLayer`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch

from uncomp_cli.engine.quantise import QuantisedBuffer
from uncomp_cli.engine.selection import select_tokens, select_tokens_per_row
from uncomp_cli.errors import UncompError

#: A full group's buffers grow by 1/GROWTH_DIVISOR of what they hold, at least MIN_GROWTH tokens.
GROWTH_DIVISOR = 16
MIN_GROWTH = 16


def buffer_tokens(tokens: int) -> int:
    """The most tokens per KV head a grouped cache's buffers hold, slack included, once ``tokens``
    per head (on average) are stored: a group that grew last at ``n ≤ t`` stored tokens holds
    ``n + max(MIN_GROWTH, n // GROWTH_DIVISOR)``. What admission reserves (docs/serving.md)."""
    return tokens + MIN_GROWTH + -(-tokens // GROWTH_DIVISOR)


class HeadGroup:
    """The KV heads of one layer that share a budget, and the tokens they keep.

    Storage is pre-allocated: ``keys``, ``values``, ``valid`` and ``positions`` are views of the first
    :meth:`length` tokens of buffers that may hold a few more, so decoding writes each new token
    into the slack instead of copying the whole group (:meth:`append`); a full buffer grows by a
    sixteenth (at least :data:`MIN_GROWTH` tokens), which keeps the copies amortised while the
    slack stays a few percent of a compressed cache. :meth:`nbytes` counts the stored tokens (what
    results report), :meth:`reserved_nbytes` the buffers, slack included. Only the slack is ever
    written in place, and only by the group that grew the buffer: a checkpoint keeps a
    :meth:`snapshot` (no slack), so whatever is restored from it reallocates before writing.
    """

    def __init__(self, heads: list[int], budget: int | None):
        self.heads = heads  # KV head indices, ascending
        self.budget = budget  # tokens kept per head; None = keep all
        #: [B, h] tokens each row keeps when rows differ (AdaKV); ``budget`` is then their max, and a
        #: row's surplus entries are invalid fillers.
        self.row_budgets: torch.Tensor | None = None
        #: 8: keys and values are stored rounded to 8 bits (:mod:`uncomp_cli.engine.quantise`) and read
        #: back dequantised; None: as given.
        self.bits: int | None = None
        self._keys: torch.Tensor | QuantisedBuffer | None = None  # [B, h, C, d], C >= length
        self._values: torch.Tensor | QuantisedBuffer | None = None  # [B, h, C, d]
        self._valid: torch.Tensor | None = None  # [B, h, C] bool; False = padding, never attended
        self._positions: torch.Tensor | None = None  # [B, h, C] int64: each stored token's original position
        self._length = 0
        self.all_valid = True  # fast path: no padding stored

    @property
    def keys(self) -> torch.Tensor | None:
        """[B, h, T, d]"""
        return None if self._keys is None else _read(self._keys, self._length)

    @property
    def values(self) -> torch.Tensor | None:
        """[B, h, T, d]"""
        return None if self._values is None else _read(self._values, self._length)

    @property
    def valid(self) -> torch.Tensor | None:
        """[B, h, T] bool"""
        return None if self._valid is None else self._valid[:, :, :self._length]

    @property
    def positions(self) -> torch.Tensor | None:
        """[B, h, T] int64"""
        return None if self._positions is None else self._positions[:, :, :self._length]

    def length(self) -> int:
        return self._length

    def holds_tokens(self) -> bool:
        """Whether anything was stored yet (cheaper than ``keys``, which reads 8-bit keys back)."""
        return self._keys is not None

    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[2]

    def nbytes(self) -> int:
        """Bytes of the stored tokens' K and V: B × h × length × d × 2 × dtype size (8 bits: a byte per
        number, with each token's minima and steps)."""
        if self._keys is None:
            return 0
        return _nbytes(self._keys, self._length) + _nbytes(self._values, self._length)

    def reserved_nbytes(self) -> int:
        """Bytes of the K and V buffers, slack included: the memory the group holds."""
        if self._keys is None:
            return 0
        return _nbytes(self._keys) + _nbytes(self._values)

    def store(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> None:
        """Hold exactly these tokens (no slack): keys/values [B, h, T, d], valid/positions [B, h, T]."""
        if self.bits is not None:
            keys, values = QuantisedBuffer.of(keys), QuantisedBuffer.of(values)
        self._keys, self._values, self._valid, self._positions = keys, values, valid, positions
        self._length = keys.shape[2]
        self.all_valid = bool(valid.all())

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor,
               all_valid: bool) -> None:
        """Add tokens after those held (shapes as :meth:`store`; ``all_valid``: ``valid`` has no False),
        growing the buffers when they are full."""
        start, count = self._length, keys.shape[2]
        if start + count > self.capacity():
            self._grow(start + count + max(MIN_GROWTH, (start + count) // GROWTH_DIVISOR))
        end = start + count
        if self.bits is not None:
            self._keys.write(start, keys)
            self._values.write(start, values)
        else:
            self._keys[:, :, start:end] = keys
            self._values[:, :, start:end] = values
        self._valid[:, :, start:end] = valid
        self._positions[:, :, start:end] = positions
        self._length = end
        self.all_valid = self.all_valid and all_valid

    def _grow(self, capacity: int) -> None:
        """New buffers of ``capacity`` tokens holding what is stored (the old ones stay as they were)."""
        def grown(buffer: torch.Tensor | QuantisedBuffer) -> torch.Tensor | QuantisedBuffer:
            if isinstance(buffer, QuantisedBuffer):
                return buffer.grown(capacity, self._length)
            shape = list(buffer.shape)
            shape[2] = capacity
            bigger = buffer.new_empty(shape)
            bigger[:, :, :self._length] = buffer[:, :, :self._length]
            return bigger

        self._keys, self._values = grown(self._keys), grown(self._values)
        self._valid, self._positions = grown(self._valid), grown(self._positions)

    def snapshot(self) -> HeadGroup:
        """A copy whose buffers are exactly the stored tokens (views, nothing copied): its first
        append reallocates, so neither copy ever writes what the other can see."""
        clone = copy.copy(self)
        if self._keys is not None:
            clone._keys, clone._values = _cut(self._keys, self._length), _cut(self._values, self._length)
            clone._valid, clone._positions = self.valid, self.positions
        return clone

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a function of a tensor over the batch dimension) to every stored tensor."""
        if isinstance(self._keys, QuantisedBuffer):  # the codes themselves: nothing rounded again
            self._keys = self._keys.cut(self._length).map(fn)
            self._values = self._values.cut(self._length).map(fn)
            self._valid, self._positions = fn(self.valid), fn(self.positions)
        elif self._keys is not None:
            self.store(fn(self.keys), fn(self.values), fn(self.valid), fn(self.positions))
        if self.row_budgets is not None:
            self.row_budgets = fn(self.row_budgets)

    def quantised_tensors(self) -> dict[str, torch.Tensor]:
        """An 8-bit group's stored parts by name (``keys.codes``, ``keys.low``, … ``values.step``; views)."""
        return {f"{name}.{part}": tensor for name, buffer in (("keys", self._keys), ("values", self._values))
                for part, tensor in _cut(buffer, self._length).tensors().items()}

    def restore_quantised(self, bits: int, keys: dict, values: dict, valid: torch.Tensor, positions: torch.Tensor,
                          dtype: torch.dtype) -> None:
        """Hold 8-bit keys and values as :meth:`QuantisedBuffer.tensors` gave them (from a file)."""
        self.bits = bits
        self._keys = QuantisedBuffer.from_tensors(keys, dtype)
        self._values = QuantisedBuffer.from_tensors(values, dtype)
        if self._keys.shape != self._values.shape or self._keys.shape[:3] != valid.shape \
                or valid.shape != positions.shape:
            raise ValueError("8-bit keys, values, validity and positions of different shapes")
        self._valid, self._positions, self._length = valid, positions, valid.shape[2]
        self.all_valid = bool(valid.all())

    def quantise(self, bits: int) -> None:
        """From now on hold keys and values rounded to ``bits`` bits (those held now included)."""
        self.bits = bits
        if self._keys is not None and not isinstance(self._keys, QuantisedBuffer):
            self.store(self.keys, self.values, self.valid, self.positions)

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


def _read(buffer: torch.Tensor | QuantisedBuffer, length: int) -> torch.Tensor:
    return buffer.read(length) if isinstance(buffer, QuantisedBuffer) else buffer[:, :, :length]


def _cut(buffer: torch.Tensor | QuantisedBuffer, length: int) -> torch.Tensor | QuantisedBuffer:
    return buffer.cut(length) if isinstance(buffer, QuantisedBuffer) else buffer[:, :, :length]


def _nbytes(buffer: torch.Tensor | QuantisedBuffer, length: int | None = None) -> int:
    if isinstance(buffer, QuantisedBuffer):
        return buffer.nbytes(length)
    held = buffer if length is None else buffer[:, :, :length]
    return held.numel() * buffer.element_size()


def take_heads(tensor: torch.Tensor, heads: list[int], per_head: int = 1) -> torch.Tensor:
    """Select heads (dim 1) of ``tensor``; ``per_head`` > 1 selects the query heads of KV heads."""
    total = tensor.shape[1]
    first = heads[0] * per_head
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return tensor[:, first: first + len(heads) * per_head] if len(heads) * per_head != total else tensor
    return tensor.index_select(1, _head_index(tuple(heads), per_head, tensor.device))


@functools.lru_cache(maxsize=256)
def _head_index(heads: tuple[int, ...], per_head: int, device: torch.device) -> torch.Tensor:
    """The dim-1 indices :func:`take_heads` selects, made once, not at every decoding step."""
    return torch.tensor([h * per_head + r for h in heads for r in range(per_head)], device=device)


def group_heads(budgets: Sequence[int | None]) -> list[HeadGroup]:
    """One group per distinct budget, its KV heads ascending."""
    by_budget: dict[int | None, list[int]] = {}
    for head, budget in enumerate(budgets):
        if budget is not None and budget < 1:
            raise UncompError(f"KV head {head} has a budget of {budget} tokens; it must be at least 1")
        by_budget.setdefault(None if budget is None else int(budget), []).append(head)
    return [HeadGroup(heads, budget) for budget, heads in by_budget.items()]


def group_rows(row_budgets: torch.Tensor) -> list[HeadGroup]:
    """Groups for budgets that differ per row (AdaKV), ``row_budgets`` int64 [B, H_kv]: a head stores
    the most any row keeps; a row keeping fewer marks the rest of its entries invalid."""
    groups = group_heads(row_budgets.amax(dim=0).tolist())
    for group in groups:
        per_row = row_budgets[:, group.heads]
        if bool((per_row != group.budget).any()):
            group.row_budgets = per_row
    return groups


def visible_tail(keys: torch.Tensor, values: torch.Tensor, row_valid: torch.Tensor, positions: torch.Tensor,
                 scores: torch.Tensor | None, window: int):
    """The prompt's tokens that the next query can see under a sliding ``window`` (the last W − 1
    positions of each row): the last columns of every row, the most of them kept, older ones in
    those columns marked invalid. keys/values [B, H_kv, N, d], row_valid/positions [B, N], scores
    [B, H_kv, N] or None -> the same, cut to the visible columns."""
    last = positions.masked_fill(~row_valid, -1).amax(-1, keepdim=True)
    visible = row_valid & (positions >= last + 2 - window)
    tail = max(int(visible.sum(-1).max()), 1)
    visible = visible[:, -tail:]
    if scores is not None:  # an older token in these columns is never chosen over a visible one
        scores = scores[..., -tail:].masked_fill(~visible[:, None, :], float("-inf"))
    return keys[:, :, -tail:], values[:, :, -tail:], visible, positions[:, -tail:], scores


def slide_window(groups: list[HeadGroup], new_positions: torch.Tensor, window: int) -> None:
    """Drop what left a sliding ``window``: tokens the next query (one past ``new_positions`` [B, q])
    cannot see are marked invalid, and the leading columns no row can see are freed."""
    threshold = new_positions.amax(-1) + 2 - window  # [B]
    for group in groups:
        valid = group.valid & (group.positions >= threshold[:, None, None])
        seen = valid.flatten(0, 1).any(0)
        first = int(seen.int().argmax()) if bool(seen.any()) else valid.shape[-1]
        group.store(group.keys[:, :, first:], group.values[:, :, first:], valid[..., first:],
                    group.positions[..., first:])


def merge_heads(outputs: list[torch.Tensor], groups: list[HeadGroup], rep: int) -> torch.Tensor:
    """Per-group attention outputs [B, h·rep, q, d], in ``groups`` order, back into query-head order
    [B, H_q, q, d]."""
    merged = torch.cat(outputs, dim=1)
    heads = tuple(h for group in groups for h in group.heads)
    return merged.index_select(1, _merge_order(heads, rep, merged.device))


@functools.lru_cache(maxsize=256)
def _merge_order(heads: tuple[int, ...], rep: int, device: torch.device) -> torch.Tensor:
    """Where each query head's output stands in the concatenated groups, made once per grouping."""
    order = torch.tensor([h * rep + r for h in heads for r in range(rep)], device=device)
    return order.argsort()
