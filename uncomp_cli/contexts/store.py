"""A least-recently-used map bounded by bytes: what keeps compressed contexts (the server) and
contexts' re-readings (an evaluation grid) without holding more memory than allowed."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class BytesLRU(Generic[V]):
    """``size(value)`` bytes per entry; putting one drops the least recently used until it fits.

    ``evict=False``: a full map keeps what it holds and refuses newcomers instead — right for a
    cyclic walk over more entries than fit (an evaluation grid, run after run over the same
    contexts), where dropping the least recently used would miss every time.
    """

    def __init__(self, limit_bytes: int, size: Callable[[V], int], evict: bool = True):
        self.limit_bytes = limit_bytes
        self.evict = evict
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: Hashable, value: V) -> None:
        """Keep ``value`` (one larger than the whole limit is not kept; a key already held stays)."""
        size = self._size(value)
        if size > self.limit_bytes or key in self._entries:
            return
        if not self.evict and self.bytes + size > self.limit_bytes:
            return
        while self._entries and self.bytes + size > self.limit_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
        self._entries[key] = (value, size)
        self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)
