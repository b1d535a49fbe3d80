"""Prefill, decode one token, decode n tokens — with whatever cache a policy provides.

The loop passes explicit ``position_ids`` everywhere: a compressed cache stores fewer tokens than it
has seen, so positions are taken from the prompt's attention mask (left padding aware) and grow by
one per step, never from a cache length. Without a policy the loop runs on transformers'
``DynamicCache`` (the full cache); a policy (:mod:`uncomp_cli.policies`) brings its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from uncomp_cli.engine.attention import sliding_windows
from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.engine.steps import (  # the step API's basics, re-exported for the callers of this module
    Batch,
    GenerationSettings,
    Row,
    forward_last,
    left_pad,
    pick_tokens,
    prompt_positions,
)
from uncomp_cli.errors import UncompError
from uncomp_cli.memory import PeakMemory
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.models.prompting import build_prompt_ids, context_length, fit_to_context

if TYPE_CHECKING:  # policies build on the engine, not the other way round
    from uncomp_cli.policies.base import CachePolicy

__all__ = ["GenerationSettings", "forward_last", "left_pad", "pick_tokens", "prompt_positions"]


@dataclass
class GenerationResult:
    """One prompt's output and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_second: float
    kv_cache_bytes: int
    full_kv_cache_bytes: int
    #: This run's peak (:class:`~uncomp_cli.memory.PeakMemory`), the same measure as ``uncomp bench``'s.
    peak_memory_bytes: int | None
    model: str
    device: str
    dtype: str
    method: str
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("token_ids")
        stats = data.pop("stats")
        return {**data, **stats}


# -- the loop -------------------------------------------------------------------------------------


@dataclass
class LoopOutput:
    tokens: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    kv_cache_bytes: int
    full_kv_cache_bytes: int
    stats: dict


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Continuation:
    """What :func:`feed_and_generate` produced: new tokens per row and the two phases' times."""

    tokens: list[list[int]]
    prefill_seconds: float  # the forward pass over the fed tokens, plus picking the first new token
    decode_seconds: float
    tokens_seen: int  # the longest row's tokens in the cache at the end: context, prompt and answer
    kv_cache_bytes: int  # the most the cache held while rows were running


def feed_and_generate(
    model,
    cache,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> Continuation:
    """Feed ``input_ids`` [B, q] at ``positions`` [B, q] into ``cache`` and generate, on the step API.

    ``cache`` is empty (a prompt's prefill) or already holds earlier tokens (a question after a
    compressed context), which ``attention_mask`` [B, earlier + q] then covers. Each row stops at
    its first end-of-sequence token (not included) or after ``settings.max_new_tokens`` and then
    leaves the batch; ``on_tokens`` sees each step's tokens [B] as they are chosen (-1 for a row
    that has ended). The caller installs whatever attention the cache needs.
    """
    device = input_ids.device
    eos = torch.tensor(sorted(set(eos_ids)), device=device, dtype=torch.long)
    size = input_ids.shape[0]
    batch = Batch(model, cache, [Row.sampling(settings, device) for _ in range(size)])
    running = list(range(size))  # the original index of each row still in the batch
    rows: list[list[int]] = [[] for _ in range(size)]

    _sync(device)
    started = time.perf_counter()
    tokens = batch.prefill(input_ids, attention_mask, positions)
    _sync(device)
    prefill_seconds = time.perf_counter() - started
    held = cache_nbytes(cache)
    started = time.perf_counter()
    for step in range(settings.max_new_tokens):
        ended = torch.isin(tokens, eos).tolist()
        chosen = tokens.tolist()
        report = [-1] * size
        for i, original in enumerate(running):
            if not ended[i]:
                rows[original].append(chosen[i])
                report[original] = chosen[i]
        if on_tokens is not None:
            on_tokens(torch.tensor(report, device=device))
        if all(ended) or step == settings.max_new_tokens - 1:
            break
        if any(ended):
            held = max(held, cache_nbytes(cache))
            batch.remove([i for i, end in enumerate(ended) if end])
            running = [original for original, end in zip(running, ended) if not end]
        tokens = batch.step()
    _sync(device)
    seen = batch.mask.shape[-1]
    return Continuation(rows, prefill_seconds, time.perf_counter() - started, seen, max(held, cache_nbytes(cache)))


def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    settings: GenerationSettings,
    eos_ids: Sequence[int],
    policy: CachePolicy | None = None,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
) -> LoopOutput:
    """Generate for a left-padded batch. input_ids, attention_mask: [B, S].

    Each row stops at its first end-of-sequence token (not included) or after
    ``settings.max_new_tokens``; ``on_tokens`` sees each step's tokens [B] as they are chosen.
    ``policy``: what the cache keeps (None: everything, in a ``DynamicCache``).
    """
    attached = contextlib.nullcontext(DynamicCache(config=model.config)) if policy is None \
        else policy.attach(model, attention_mask)
    with attached as cache:
        out = feed_and_generate(model, cache, input_ids, attention_mask, prompt_positions(attention_mask), settings,
                                eos_ids, on_tokens)
        return LoopOutput(
            tokens=out.tokens,
            prefill_seconds=out.prefill_seconds,
            decode_seconds=out.decode_seconds,
            kv_cache_bytes=out.kv_cache_bytes,
            full_kv_cache_bytes=full_kv_cache_bytes(model.config, input_ids.shape[0], out.tokens_seen, model.dtype),
            stats={} if policy is None else policy.stats(cache),
        )


# -- memory accounting ----------------------------------------------------------------------------


def full_kv_cache_bytes(config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """What an uncompressed cache holds for ``tokens`` positions per row: Σ layers B × H_kv × T × d × 2,
    where a sliding-window layer's T is at most W − 1 (transformers' cache keeps no more)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    held = sum(tokens if window is None else min(tokens, window - 1) for window in sliding_windows(config))
    return batch * kv_heads * held * head_dim * 2 * element


# -- text in, text out ----------------------------------------------------------------------------


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    config_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, getattr(loaded.tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


class TextStream:
    """Incremental detokenisation: returns the new text for each token, never half a character."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0
        self.printed = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta = text[self.printed:]
        if text.endswith(("\n", " ")):  # a safe boundary: restart decoding here to stay O(n)
            self.start, self.printed = len(self.ids), 0
        else:
            self.printed = len(text)
        return delta

    def flush(self) -> str:
        """Whatever is still held back at the end (it may be an incomplete character)."""
        text = self.tokenizer.decode(self.ids[self.start:], skip_special_tokens=True)
        delta, self.start, self.printed = text[self.printed:], len(self.ids), 0
        return delta


def encode_prompt(loaded: LoadedModel, prompt: str, settings: GenerationSettings, system: str | None = None,
                  raw: bool = False, truncate: str = "none") -> list[int]:
    """Prompt token ids, checked against the model's context (or middle-truncated to fit)."""
    ids = build_prompt_ids(loaded.tokenizer, prompt, system=system, raw=raw)
    return fit_to_context(ids, context_length(loaded.model.config), settings.max_new_tokens, truncate)


def result_of(loaded: LoadedModel, policy: CachePolicy | None, new_ids: list[int], prompt_tokens: int,
            out: LoopOutput, peak: int | None, extra: dict | None = None) -> GenerationResult:
    """The result of one row of a loop: text, counts, costs, and the policy's settings and stats."""
    decode_steps = max(len(new_ids) - 1, 0)  # the first new token comes out of the prefill
    return GenerationResult(
        text="" if loaded.tokenizer is None else loaded.tokenizer.decode(new_ids, skip_special_tokens=True),
        token_ids=new_ids,
        prompt_tokens=prompt_tokens,
        new_tokens=len(new_ids),
        prefill_seconds=out.prefill_seconds,
        decode_seconds=out.decode_seconds,
        decode_tokens_per_second=decode_steps / out.decode_seconds if out.decode_seconds > 0 else 0.0,
        kv_cache_bytes=out.kv_cache_bytes,
        full_kv_cache_bytes=out.full_kv_cache_bytes,
        peak_memory_bytes=peak,
        model=loaded.name,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        method="full" if policy is None else policy.name,
        stats=_settings(policy) | out.stats | (extra or {}),
    )


def _settings(policy: CachePolicy | None) -> dict:
    return {} if policy is None else {k: v for k, v in policy.describe().items() if k != "method"}


def generate(
    loaded: LoadedModel,
    prompt: str,
    settings: GenerationSettings | None = None,
    policy: CachePolicy | None = None,
    system: str | None = None,
    raw: bool = False,
    truncate: str = "none",
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Generate a reply to one prompt; ``on_text`` receives the text as it is produced."""
    settings = settings or GenerationSettings()
    settings.validate()
    ids = encode_prompt(loaded, prompt, settings, system=system, raw=raw, truncate=truncate)
    input_ids = torch.tensor([ids], device=loaded.device)
    attention_mask = torch.ones_like(input_ids)
    stream = TextStream(loaded.tokenizer)

    def emit(tokens: torch.Tensor) -> None:
        if on_text is not None and int(tokens[0]) >= 0:
            delta = stream.push(int(tokens[0]))
            if delta:
                on_text(delta)

    meter = PeakMemory(loaded.device)
    meter.start()
    out = generate_ids(loaded.model, input_ids, attention_mask, settings, eos_token_ids(loaded), policy, emit)
    peak = meter.peak()
    if on_text is not None and (rest := stream.flush()):
        on_text(rest)
    return result_of(loaded, policy, out.tokens[0], len(ids), out, peak)


@dataclass
class BatchItem:
    """One prompt of a batch run; ``max_new_tokens`` overrides the run's setting for this prompt."""

    prompt: str
    system: str | None = None
    raw: bool = False
    max_new_tokens: int | None = None
    label: str = ""  # names the item in error messages, e.g. "line 3"


def generate_batch(
    loaded: LoadedModel,
    items: Sequence[BatchItem],
    settings: GenerationSettings | None = None,
    policy: CachePolicy | None = None,
    batch_size: int = 8,
    truncate: str = "none",
    on_result: Callable[[int, GenerationResult], None] | None = None,
) -> list[GenerationResult]:
    """Generate for many prompts, ``batch_size`` at a time, left-padded; results in input order.

    Every prompt is encoded and checked before anything runs, so a bad item stops the run before
    any output exists. Prompts are batched with neighbours of similar length to waste little on
    padding; ``on_result(index, result)`` is called as each batch finishes.
    """
    settings = settings or GenerationSettings()
    settings.validate()
    if batch_size < 1:
        raise UncompError(f"--batch-size must be at least 1, got {batch_size}")
    encoded: list[list[int]] = []
    limits: list[int] = []
    for item in items:
        own = GenerationSettings(max_new_tokens=item.max_new_tokens or settings.max_new_tokens)
        try:
            own.validate()
            encoded.append(encode_prompt(loaded, item.prompt, own, system=item.system, raw=item.raw,
                                         truncate=truncate))
        except UncompError as exc:
            raise type(exc)(f"{item.label}: {exc}" if item.label else str(exc)) from None
        limits.append(own.max_new_tokens)
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = (eos_token_ids(loaded) or [0])[0]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    results: list[GenerationResult | None] = [None] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, mask = left_pad([encoded[i] for i in chunk], pad_id, loaded.device)
        run = GenerationSettings(max_new_tokens=max(limits[i] for i in chunk), temperature=settings.temperature,
                                 top_p=settings.top_p, seed=settings.seed)
        meter = PeakMemory(loaded.device)
        meter.start()
        out = generate_ids(loaded.model, input_ids, mask, run, eos_token_ids(loaded), policy)
        peak = meter.peak()
        for row, index in enumerate(chunk):
            result = result_of(loaded, policy, out.tokens[row][: limits[index]], len(encoded[index]), out, peak,
                             {"batch_size": len(chunk)})
            results[index] = result
            if on_result is not None:
                on_result(index, result)
    return [r for r in results if r is not None]
