"""The engine's step API: rows start (a prefill, optionally in chunks), decode one step at a time,
and leave. Every generation loop drives it: ``uncomp generate`` (one row), its batch mode, the
questions on a compressed context, evaluation and the server.

A :class:`Batch` is rows decoding together over one cache: row ``i`` is index ``i`` of the cache's
batch dimension, with its own position (left padding and compressed caches never decide
positions: they come from the prompt's mask and grow by one per step), its own sampling state
(:class:`Row`: settings and random generator, so a seeded row samples the same tokens alone or in
any batch) and its own slice of the cache, freed when the row leaves (:meth:`Batch.remove`).
When to stop a row (end of sequence, a length, a stop string, a client gone) is the caller's
decision; the batch only feeds, samples and forgets.

Shape letters (as gpt-fast's comments): B rows, q new tokens, T tokens the mask covers, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from uncomp_cli.engine.cache import GroupedKVCache
from uncomp_cli.errors import UncompError


@dataclass
class GenerationSettings:
    """How to pick tokens. ``temperature == 0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UncompError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UncompError(f"--temperature must be 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UncompError(f"--top-p must be in (0, 1], got {self.top_p}")


def pick_tokens(logits: torch.Tensor, settings: GenerationSettings,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or temperature/top-p sampling. logits: [B, V] -> tokens [B]."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p  # always keeps the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch: [B, S] -> [B, S], 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token rows on the left. -> input_ids, attention_mask: [B, max_len]."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, device=device)
        mask[i, width - len(row):] = 1
    return ids, mask


@torch.inference_mode()
def forward_last(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> torch.Tensor:
    """One forward pass into ``cache``; only the last position's logits are computed.
    input_ids, position_ids: [B, q]; attention_mask: [B, T] (T = tokens seen before + q) -> [B, V]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


def feed(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
         chunk: int | None = None) -> torch.Tensor:
    """Feed ``input_ids`` [B, q] at ``positions`` [B, q] into ``cache``, ``chunk`` tokens per forward
    pass (None: all at once); ``attention_mask`` [B, T] covers what the cache saw before and the q
    new tokens. Returns the last position's logits [B, V].

    A compressed cache chooses what it keeps at the end of its prefill, from the prefill's last
    queries, so it takes a prompt in one piece, unless it was built from a deferred plan
    (``plan.deferred()``: it keeps every token until ``cache.select_by_window()``, called after
    the last chunk, selects exactly what one piece would have). Chunks also go to caches that keep
    every token (the full cache, budgets that hold the prompt) and to a cache that already holds
    its prefill (a question, a re-reading)."""
    count = input_ids.shape[1]
    if chunk is None or chunk >= count:
        return forward_last(model, input_ids, attention_mask, positions, cache)
    if chunk < 1:
        raise UncompError(f"a prefill chunk must be at least 1 token, got {chunk}")
    if isinstance(cache, GroupedKVCache) and cache.get_seq_length() == 0 and not cache.keeps(attention_mask.shape[-1]):
        raise UncompError("a compressing cache selects at the end of its prefill: feed its prompt in one piece, "
                          "or build it from plan.deferred() and call select_by_window() after the last chunk")
    before = attention_mask.shape[-1] - count
    for start in range(0, count, chunk):
        end = min(start + chunk, count)
        logits = forward_last(model, input_ids[:, start:end], attention_mask[:, :before + end],
                              positions[:, start:end], cache)
    return logits


@dataclass
class Row:
    """One sequence of a batch: how it samples, and the tokens chosen for it so far."""

    settings: GenerationSettings
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)

    @classmethod
    def sampling(cls, settings: GenerationSettings, device: torch.device | str) -> Row:
        """A row with its own random generator when ``settings`` carries a seed."""
        generator = None if settings.seed is None else torch.Generator(device=device).manual_seed(settings.seed)
        return cls(settings, generator)


class Batch:
    """Rows decoding together over one cache: :meth:`prefill` once, then :meth:`step` until the
    caller has removed every row (:meth:`remove`). The caller installs whatever attention the
    cache needs (a policy's ``attach`` or ``resume``) around the calls."""

    def __init__(self, model, cache, rows: Sequence[Row]):
        self.model, self.cache = model, cache
        self.rows = list(rows)
        self.mask: torch.Tensor | None = None  # [B, T]: every token each row's cache has seen
        self.next_position: torch.Tensor | None = None  # [B, 1]
        self.last: torch.Tensor | None = None  # [B]: each row's latest token, fed by the next step

    def __len__(self) -> int:
        return len(self.rows)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                chunk: int | None = None) -> torch.Tensor:
        """Feed the rows' prompts (input_ids, positions: [B, q]; attention_mask: [B, T], the tokens
        the cache held before included) and pick each row's first token -> [B]."""
        if input_ids.shape[0] != len(self.rows):
            raise UncompError(f"{input_ids.shape[0]} prompts for a batch of {len(self.rows)} rows")
        logits = feed(self.model, self.cache, input_ids, attention_mask, positions, chunk)
        self.mask, self.next_position = attention_mask, positions[:, -1:] + 1
        return self._pick(logits)

    def step(self) -> torch.Tensor:
        """Feed each row's latest token and pick its next one -> [B]."""
        if self.last is None:
            raise UncompError("step() follows prefill()")
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=-1)
        logits = forward_last(self.model, self.last[:, None], self.mask, self.next_position, self.cache)
        self.next_position = self.next_position + 1
        return self._pick(logits)

    def remove(self, indices: Sequence[int]) -> None:
        """The rows at ``indices`` leave: their cache entries are freed, the others go on."""
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.mask.device)
        if keep:
            self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.next_position, self.last = self.mask[index], self.next_position[index], self.last[index]

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's token from logits [B, V] with its own settings and generator -> [B]."""
        if all(row.settings.temperature == 0 for row in self.rows):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.stack([pick_tokens(logits[i:i + 1], row.settings, row.generator)[0]
                                  for i, row in enumerate(self.rows)])
        self.last = tokens
        return tokens
