"""Compressed contexts the server keeps for reuse: a least-recently-used map bounded by KV bytes.

Keyed by how the context was compressed (method, options, scorer) and the hash of its tokens, so a
context compressed under one budget never answers a request that asked for another. Only the
worker thread touches it.
"""

from __future__ import annotations

from collections import OrderedDict

from uncomp_cli.contexts.compress import CompressedContext


class ContextStore:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[tuple, CompressedContext] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple) -> CompressedContext | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: tuple, context: CompressedContext) -> None:
        """Keep ``context``, dropping the least recently used ones to stay under the limit (one larger
        than the whole limit is not kept)."""
        size = context.kv_cache_bytes()
        if size > self.limit_bytes or key in self._entries:
            return
        while self._entries and self.bytes + size > self.limit_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.kv_cache_bytes()
        self._entries[key] = context
        self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)
