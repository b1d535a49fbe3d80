"""Compressed contexts the server keeps for reuse: a least-recently-used map bounded by KV bytes.

Keyed by how the context was compressed (method, options, scorer) and the hash of its tokens, so a
context compressed under one budget never answers a request that asked for another. Only the
worker thread touches it.
"""

from __future__ import annotations

from uncomp_cli.contexts.compress import CompressedContext
from uncomp_cli.contexts.store import BytesLRU


class ContextStore(BytesLRU[CompressedContext]):
    def __init__(self, limit_bytes: int):
        super().__init__(limit_bytes, lambda context: context.kv_cache_bytes())
