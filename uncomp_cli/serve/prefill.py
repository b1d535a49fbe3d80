"""One request's prompt into a cache of its own, a chunk at a time between the running rows' steps.

Every request gets the grouped cache its method's plan builds for its whole prompt. A prompt
longer than one chunk is fed in chunks into the plan made *deferred* — every token kept until the
last chunk, whose last ``window`` queries then score the prompt exactly as a one-piece prefill
would (:meth:`~uncomp_cli.engine.cache.GroupedKVCache.select_by_window`) — so running streams get
a decode step after every chunk. Two things need the whole prompt in one forward pass and are
fed in one piece: hidden-state pruning is dropped for chunked prompts (a pruning point needs the
previous layer's attention over the whole prompt; docs/methods.md "Chunked prefill"), and H2O
(which scores with every prompt query) and sliding-window models prefill in one piece.

A document asked about (:mod:`uncomp_cli.serve.prompts` splits the first user message at its last
paragraph break) is kept at full precision, before any selection, in the :class:`PrefixStore`: the
first question is compressed with the question known (query-aware, as without reuse, and at the
cost of the same prefill); a later turn about the same document takes the stored prefix (no
prefill of the document) and feeds only its own tokens before its own selection.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from uncomp_cli.contexts.store import BytesLRU
from uncomp_cli.engine.attention import sliding_windows, use_grouped_cache
from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.engine.plan import CachePlan
from uncomp_cli.engine.prefill import HiddenStatePruner
from uncomp_cli.engine.steps import forward_last
from uncomp_cli.policies.base import CachePolicy

log = logging.getLogger("uncomp.serve")


@dataclass
class Prefix:
    """A document's cache before any selection: each layer holding every token (deferred)."""

    layers: list
    tokens: int

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


class PrefixStore(BytesLRU[Prefix]):
    """Documents' full-precision prefixes, least recently used dropped first, bounded by bytes.

    With a ``directory`` (:class:`~uncomp_cli.serve.context_dir.ContextDirectory`, shared by
    replicas) a miss in memory looks there before the document is prefilled again, and every new
    prefix is written there too, by one background thread (the snapshot's tensors are never
    written again, so the worker goes on at once)."""

    def __init__(self, limit_bytes: int, directory=None):
        super().__init__(limit_bytes, Prefix.nbytes)
        self.directory = directory
        self.source: str | None = None  # where the last get() found its prefix
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="uncomp-context-dir") if directory else None

    def get(self, key: str) -> Prefix | None:
        """The prefix of document ``key``: from memory, else from the directory; ``source`` says which."""
        prefix = super().get(key)
        self.source = None if prefix is None else "memory"
        if prefix is None and self.directory is not None and (prefix := self.directory.load(key)) is not None:
            super().put(key, prefix)
            self.source = "directory"
        return prefix

    def put(self, key: str, value: Prefix) -> None:
        super().put(key, value)
        if self._writer is not None:
            self._writer.submit(self._write, key, value)

    def _write(self, key: str, value: Prefix) -> None:
        try:
            self.directory.save(key, value)
        except Exception:  # a full or unreachable folder costs reuse, not the request
            log.exception("context directory: could not write a document's prefix")

    def close(self) -> None:
        """Finish the writes already asked for."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)


def document_key(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


@dataclass
class PromptFeed:
    """A request's prefill in progress: :meth:`advance` feeds one chunk; when it returns logits
    [1, V] the prompt is in ``cache`` and the row may join the decoding batch."""

    model: torch.nn.Module
    cache: GroupedKVCache
    ids: list[int]  # what is still to feed
    start: int  # the position of ids[0]
    chunk: int  # tokens per forward pass (the whole rest when not chunked)
    chunked: bool
    store: PrefixStore | None = None
    document: tuple[str, int] | None = None  # (key, tokens) of a prefix to keep once it is in
    stats: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Tokens the row will have seen once its prompt is in."""
        return self.start + len(self.ids)

    @torch.inference_mode()
    def advance(self) -> torch.Tensor | None:
        """Feed the next chunk; the last one's logits [1, V] when the prompt is in, else None."""
        size = self.chunk
        if self.document is not None:  # stop at the document's end to keep its prefix
            size = min(size, self.document[1] - self.start)
        piece, self.ids = self.ids[:size], self.ids[size:]
        device = self.cache.layers[0].device if self.cache.layers[0].is_initialized else self.model.device
        input_ids = torch.tensor([piece], device=device)
        end = self.start + len(piece)
        positions = torch.arange(self.start, end, device=device)[None]
        mask = torch.ones(1, end, dtype=torch.long, device=device)
        with use_grouped_cache(self.model, self.cache), contextlib.ExitStack() as stack:
            if self.cache.plan.prune is not None:  # one piece: hidden-state pruning as planned
                stack.enter_context(HiddenStatePruner(self.model, self.cache))
            logits = forward_last(self.model, input_ids, mask, positions, self.cache)
        self.start = end
        if self.document is not None and self.start == self.document[1]:
            self.store.put(self.document[0], Prefix([layer.snapshot() for layer in self.cache.layers], end))
            self.document = None
        if self.ids:
            return None
        if self.chunked and self.cache.plan.layers[0].defer_selection:
            self.cache.select_by_window()
        return logits


def start_feed(model: torch.nn.Module, policy: CachePolicy, ids: list[int], chunk: int,
               context_ids: list[int] | None = None, store: PrefixStore | None = None) -> PromptFeed:
    """The prefill of one request: its policy's plan for the whole prompt ``ids`` (whose first
    ``len(context_ids)`` tokens are a document kept in ``store``, when given)."""
    config = model.config
    mask = torch.ones(1, len(ids), dtype=torch.long)
    plan = policy.plan(model, mask) or CachePlan.keep_all(config.num_hidden_layers, config.num_key_value_heads)
    one_piece = any(layer.scorer.needs_all_queries for layer in plan.layers) or \
        any(window is not None for window in sliding_windows(config))
    stats: dict = {}
    if one_piece or (len(ids) <= chunk and context_ids is None):
        return PromptFeed(model, GroupedKVCache(plan), ids, 0, len(ids), False, stats=stats)
    if plan.prune is not None:
        plan = plan.without_pruning()
        stats["prefill_pruned"] = False
    cache = GroupedKVCache(plan.deferred())
    feed = PromptFeed(model, cache, ids, 0, chunk, True, stats=stats)
    if context_ids is None or store is None:
        return feed
    key = document_key(context_ids)
    prefix = store.get(key)
    stats["context_tokens"] = len(context_ids)
    stats["context_reused"] = prefix is not None
    if prefix is not None:
        stats["context_from"] = store.source
    if prefix is None:
        feed.document = (key, len(context_ids))
        feed.store = store
        return feed
    for layer, whole in zip(cache.layers, prefix.layers):
        layer.adopt(whole)
    feed.ids, feed.start = ids[prefix.tokens:], prefix.tokens
    return feed
