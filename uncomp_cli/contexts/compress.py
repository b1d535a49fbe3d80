"""Compress a context once, then ask it many questions.

The context is prefilled under a cache policy on its own (query-agnostic, kvpress's setting), so no
question can tell the method what to keep. Three ways to score the context's tokens:

* ``window``: the method's own selection at the end of prefill, whose observation window is then
  the end of the context. Free, but it keeps what the context's last sentences look at.
* ``reconstruct`` (KVzip, arXiv 2505.23416; the default): after a prefill that keeps every
  token, the model re-reads the context behind a repeat prompt ("Repeat the previous context
  exactly.") on that full cache (:mod:`uncomp_cli.contexts.reread`); each KV entry's score is the
  most attention any re-reading query of its KV head pays it, and every layer's and head's entries
  are ranked together (:func:`allocate_globally`; the method sets how many entries are kept in all).
  Costs one more pass over the context (~4.5 prefills on a CPU), paid once per compressed context; the
  re-reading tokens are dropped afterwards.
* ``gate``: the re-reading's scores predicted during the prefill by a small learned gate
  (:mod:`uncomp_cli.contexts.gate`, KVzap's idea), then ranked as ``reconstruct`` ranks them. About
  one prefill; trained once per model on calibration text and cached.

UNComp's hidden-state pruning is off for contexts unless the policy asks for it
(:meth:`~uncomp_cli.policies.base.CachePolicy.for_context`): it would be decided by the end of the
context, and the pruned layers would never hold what a question asks.

Each question then
runs on the compressed cache at the context's absolute positions (the question itself is never
compressed), is answered, and the cache returns to the compressed context
(:mod:`uncomp_cli.engine.checkpoint`), so one compression serves every question.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import Cache

from uncomp_cli.contexts.gate import gate_for, predicting
from uncomp_cli.contexts.reread import reread
from uncomp_cli.contexts.store import BytesLRU
from uncomp_cli.contexts.words import pool_over_words, word_ids
from uncomp_cli.defaults import DEFAULT_CONTEXT_SCORER
from uncomp_cli.engine.cache import GroupedKVCache, cache_nbytes
from uncomp_cli.engine.checkpoint import checkpoint, rollback
from uncomp_cli.engine.generation import (
    GenerationResult,
    GenerationSettings,
    LoopOutput,
    TextStream,
    eos_token_ids,
    feed_and_generate,
    full_kv_cache_bytes,
    result_of,
)
from uncomp_cli.engine.quantise import check_kv_bits
from uncomp_cli.engine.selection import PRUNE_WINDOW
from uncomp_cli.engine.steps import feed, prompt_positions
from uncomp_cli.errors import PromptError, UncompError
from uncomp_cli.memory import PeakMemory
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.models.prompting import context_length, context_prompt, question_ids
from uncomp_cli.policies.base import CachePolicy
from uncomp_cli.policies.full import FullCachePolicy

CONTEXT_SCORERS = ("window", "reconstruct", "gate")
#: First tokens every head keeps when a re-reading decides (KVzip's 4 attention sinks).
SINKS = 4
#: Share of the mean head budget that every head spends on the same tokens: those the heads agree
#: on most (:data:`CONSENSUS`). An answer needs the needle in nearly every head, and a ranking by
#: each head's own scores leaves it in few; a quarter (by votes, the consensus then) answered the
#: most development needles (three wordings) at 5 % and 10 % (docs/results.md, "Tokens every head keeps").
SHARED_TOKENS = 0.25
#: How the heads' agreement on a token is measured: ``rank`` (its mean percentile in every head's
#: scores, ranked at bfloat16 precision so that a recording's precision reorders no near-ties) or
#: ``votes`` (how many heads the global ranking keeps it in). With four needles in a context, votes
#: shared parts of one or two of them and the answers lost their keys; ranks kept 44 of the full
#: cache's 59 development multi-query answers against 39, and as many single needles. Held out:
#: 14 of 18 multi-query answers against 13, but 106 of 120 single needles against 109 — a trade,
#: not a clear win (docs/results.md, "Multi-query").
CONSENSUS = "rank"
#: How much the method's own head budgets weight each head's re-reading scores in the global
#: ranking: its share of the mean budget to this power. 0 (KVzip's plain ranking): the method sets
#: only the total, so every attention-based method keeps the same tokens at the same budget. With
#: whole words, UNComp's entropy shares (power 1) answered 110 of 120 development needles against
#: 116 unweighted (docs/results.md, "Whole words").
SHARE_POWER = 0.0
#: Whether a head keeps whole words (:mod:`uncomp_cli.contexts.words`): each token scores the most
#: of its word's tokens, so a number is kept with all of its digits or not at all.
WHOLE_WORDS = True


def selection_settings() -> dict:
    """The settings above that decide what a scored context keeps, beside its method and budget.
    Part of an evaluation's identity (``uncomp eval --query-agnostic``), so results made under other
    settings (an older version, an experiment) are run anew instead of resumed."""
    return {"shared_tokens": SHARED_TOKENS, "consensus": CONSENSUS, "share_power": SHARE_POWER,
            "whole_words": WHOLE_WORDS}


@dataclass
class CompressedContext:
    """A context prefilled and compressed once. ``cache`` holds what the policy kept; the next
    token's position is ``context_tokens`` (the uncompressed length), whatever the cache stores."""

    cache: Cache
    policy: CachePolicy
    context_tokens: int
    tail: str  # the chat template's text after each question ("" for raw contexts)
    prefill_seconds: float  # the context's prefill and compression (0 for a context loaded from a file)
    stats: dict = field(default_factory=dict)
    _saved: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._saved = checkpoint(self.cache)

    def restore(self) -> None:
        """Drop whatever was fed after the context (a question, an answer): back to the context alone."""
        rollback(self.cache, self._saved)

    def kv_cache_bytes(self) -> int:
        return cache_nbytes(self.cache)

    def full_kv_cache_bytes(self, loaded: LoadedModel) -> int:
        """What an uncompressed cache holds for the context."""
        return full_kv_cache_bytes(loaded.model.config, 1, self.context_tokens, loaded.model.dtype)

    def summary(self) -> dict:
        """The context's statistics, shared by every answer."""
        return {"context_tokens": self.context_tokens, "context_prefill_seconds": round(self.prefill_seconds, 4),
                "context_kv_cache_bytes": self.kv_cache_bytes()} | self.stats


def compress_context(loaded: LoadedModel, context: str, policy: CachePolicy | None = None,
                     system: str | None = None, raw: bool = False,
                     scorer: str = DEFAULT_CONTEXT_SCORER, kv_bits: int | None = None) -> CompressedContext:
    """Prefill ``context`` (chat-templated as the start of a user message, unless ``raw``) under
    ``policy`` (default: the full cache) and keep what it keeps, scoring tokens by ``scorer``
    (``window``, ``reconstruct`` or ``gate``, see the module docstring; methods that do not choose by
    attention ignore it); ``kv_bits`` 8: hold what is kept rounded to 8 bits
    (:mod:`uncomp_cli.engine.quantise`)."""
    ids, tail = context_prompt(loaded.tokenizer, context, system=system, raw=raw)
    return compress_ids(loaded, ids, policy, scorer, tail, kv_bits=kv_bits)


def check_context_scorer(scorer: str) -> str:
    if scorer not in CONTEXT_SCORERS:
        raise UncompError(f"--context-scorer must be one of {', '.join(CONTEXT_SCORERS)}, got {scorer!r}")
    return scorer


def compress_ids(loaded: LoadedModel, ids: list[int], policy: CachePolicy | None = None,
                 scorer: str = DEFAULT_CONTEXT_SCORER, tail: str = "",
                 readings: BytesLRU[Reading] | None = None, kv_bits: int | None = None) -> CompressedContext:
    """:func:`compress_context` for a context already tokenised (template included): ``ids``.

    ``readings``: re-readings (or the gate's predictions) kept for other policies and budgets on the
    same model (an evaluation grid). A policy whose
    :meth:`~uncomp_cli.policies.base.CachePolicy.reading_key` matches one kept for these ids and
    this scorer selects from it instead of prefilling and scoring again; its ``prefill_seconds``
    still count the shared reading's cost, as if it had paid it. ``kv_bits``: as for
    :func:`compress_context`.
    """
    check_context_scorer(scorer)
    check_kv_bits(kv_bits)
    policy = (policy or FullCachePolicy()).for_context()
    limit = context_length(loaded.model.config)
    if len(ids) >= limit:
        raise PromptError(f"the context is {len(ids)} tokens but the model's context is {limit} tokens; "
                          "shorten it to leave room for questions and answers")
    deferred = scorer in ("reconstruct", "gate") and policy.selects_by_attention  # scored after the prefill
    input_ids = torch.tensor([ids], device=loaded.device)
    mask = torch.ones_like(input_ids)
    gate = gate_for(loaded) if deferred and scorer == "gate" else None  # its one-off training is no context's cost
    started = time.perf_counter()
    words = word_ids(loaded.tokenizer, ids) if deferred and WHOLE_WORDS and loaded.tokenizer is not None else None
    key = shared = None
    if deferred and readings is not None and (kind := policy.reading_key(loaded.model, mask)) is not None:
        key = (tuple(ids), tail, kind, scorer)
        shared = readings.get(key)
    if shared is not None:
        cache = policy.make_cache(loaded.model, mask)
        for layer, whole in zip(cache.layers, shared.layers):
            layer.adopt(whole)
        allocate_globally(cache.layers, shared.recorded, words=words)
    else:
        plan = policy.plan(loaded.model, mask)
        with (predicting(gate, loaded.model) if gate is not None else contextlib.nullcontext()) as predicted, \
                policy.attach(loaded.model, mask, plan.deferred() if deferred else plan) as cache, \
                torch.inference_mode():
            feed(loaded.model, cache, input_ids, mask, prompt_positions(mask))
        if deferred:
            recorded = predicted if gate is not None else reread(loaded, cache, policy, ids, tail)
            if key is not None:
                readings.put(key, Reading(checkpoint(cache), recorded, time.perf_counter() - started))
            allocate_globally(cache.layers, recorded, words=words)
    if kv_bits is not None:
        if not isinstance(cache, GroupedKVCache):
            raise UncompError(f"--kv-bits rounds a compressed cache; method {policy.name!r} keeps the model's "
                              "own cache")
        for layer in cache.layers:
            layer.quantise(kv_bits)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)
    seconds = time.perf_counter() - started + (0.0 if shared is None else shared.seconds)
    stats = policy.stats(cache) | {"context_scorer": scorer if policy.selects_by_attention else None}
    if kv_bits is not None:
        stats["kv_bits"] = kv_bits
    if deferred:  # the global ranking spread the method's budgets anew: report what each head keeps
        kept = [b for layer in cache.layers for b in layer.budgets]
        stats |= {"kv_budget_tokens_mean": round(sum(kept) / len(kept), 2), "kv_budget_tokens_min": min(kept),
                  "kv_budget_tokens_max": max(kept)}
    return CompressedContext(cache, policy, len(ids), tail, seconds, stats)


@dataclass
class Reading:
    """A context's re-reading, before any budget is kept: each layer holding the whole context
    (as :func:`checkpoint` saved it) and the scores it recorded [1, H_kv, N_l]; ``seconds``: the
    prefill and re-reading it took."""

    layers: list
    recorded: list[torch.Tensor]
    seconds: float

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers) + sum(r.numel() * r.element_size() for r in self.recorded)


def reading_store(limit_bytes: int) -> BytesLRU[Reading]:
    """Where :func:`compress_ids` keeps re-readings for other policies and budgets (one model). When
    full it keeps the first ones: a grid walks the same contexts run after run."""
    return BytesLRU(limit_bytes, Reading.nbytes, evict=False)


def allocate_globally(layers: list, recorded: list[torch.Tensor], pool: int = 1, floor: float = 0.0,
                      share_power: float | None = None, shared: float | None = None, consensus: str | None = None,
                      words: torch.Tensor | None = None, shared_words: bool = False) -> None:
    """KVzip's allocation: rank every layer's and KV head's entries together and keep the best.

    recorded: per layer [1, H_kv, N_l] scores. The method's own per-head budgets set the total and
    weight each head's scores by its share of the mean budget raised to ``share_power`` (default
    :data:`SHARE_POWER`, 0: every head's scores count alike, as in KVzip; 1: UNComp's high-entropy
    heads and PyramidKV's lower layers keep more). The first :data:`SINKS` and last :data:`PRUNE_WINDOW` tokens
    of every head are always kept. ``pool`` (odd): a token scores the most of its ``pool``
    neighbours, so a kept token keeps the tokens around it (a number's digits); ``floor``: every
    head first keeps that share of its own budget by its own ranking, the global ranking spreads
    the rest (1: each head keeps exactly its method's budget);
    ``shared`` (default :data:`SHARED_TOKENS`): that share of the mean budget goes to tokens every
    head keeps — the tokens the heads agree on most (``consensus``, default :data:`CONSENSUS`:
    ``rank``, its mean percentile in every head's scores; ``votes``, how many heads the ranking
    above keeps a token in) — because an answer needs the needle in nearly every head, not in
    the few that score it highest (docs/results.md). Only when every layer holds the same tokens
    (no pruned context); the sinks and window come on top. ``words`` ([N] word numbers,
    :func:`~uncomp_cli.contexts.words.word_ids`): each token first scores the most of its word's
    tokens, in layers that hold all N; ``shared_words``: the shared tokens are then extended to
    the whole words they touch (a word's tokens tie in agreement, so the cut-off can fall inside one;
    off, on trial: docs/results.md, "Whole words").
    """
    shared = SHARED_TOKENS if shared is None else shared
    share_power = SHARE_POWER if share_power is None else share_power
    if words is not None:
        words = words.to(recorded[0].device)  # once, not once a layer
    consensus = consensus or CONSENSUS
    lengths = [scores.shape[-1] for scores in recorded]
    budgets = [torch.tensor([n if b is None else min(int(b), n) for b in layer.budgets], dtype=torch.float64)
               for layer, n in zip(layers, lengths)]
    mean = float(torch.cat(budgets).mean())
    weighted = []
    for scores, share in zip(recorded, budgets):
        scores = scores[0].double()
        if words is not None and scores.shape[-1] == words.shape[0]:
            scores = pool_over_words(scores, words)
        if pool > 1:
            scores = torch.nn.functional.max_pool1d(scores[None], pool, stride=1, padding=pool // 2)[0]
        scores = scores * (share / mean).pow(share_power).to(scores.device)[:, None]  # [H_kv, N]
        scores[:, :SINKS] = scores[:, -PRUNE_WINDOW:] = float("inf")
        if floor > 0:  # the sinks and window count towards a head's own share
            own = (share * floor).long().clamp(max=scores.shape[-1])
            for head, count in enumerate(own.tolist()):
                if count:
                    scores[head, scores[head].topk(count).indices] = float("inf")
        weighted.append(scores)
    total = int(sum(float(b.sum()) for b in budgets))
    heads = weighted[0].shape[0]
    if shared > 0 and len(set(lengths)) == 1:
        agreement = _agreed_tokens(weighted, total, consensus)
        agreement[:SINKS] = agreement[-PRUNE_WINDOW:] = -1.0  # kept by every head already
        agreed = agreement.topk(min(int(shared * mean), lengths[0])).indices
        if shared_words and words is not None and words.shape[0] == lengths[0]:
            touched = torch.zeros(int(words.max()) + 1, dtype=torch.bool, device=words.device)
            touched[words[agreed]] = True
            agreed = touched[words].nonzero().flatten()
        for scores in weighted:
            scores[:, agreed] = float("inf")
    owner = torch.cat([torch.arange(heads).repeat_interleave(n) + index * heads for index, n in enumerate(lengths)])
    best = torch.cat([s.reshape(-1) for s in weighted]).topk(total).indices.cpu()  # exactly `total`, ties broken
    counts = torch.bincount(owner[best], minlength=len(layers) * heads).view(len(layers), heads)
    for layer, scores, n, kept in zip(layers, weighted, lengths, counts):
        layer.select(scores[None].float(), PRUNE_WINDOW, kept.clamp(min=min(n, SINKS + PRUNE_WINDOW), max=n).tolist())


def _agreed_tokens(weighted: list[torch.Tensor], total: int, consensus: str) -> torch.Tensor:
    """How much the heads agree on each token [N] (every layer holding the same N tokens)."""
    stacked = torch.cat(weighted)  # [layers × H_kv, N]
    if consensus == "votes":
        best = stacked.reshape(-1).topk(total).indices
        return torch.bincount(best % stacked.shape[-1], minlength=stacked.shape[-1]).double()
    if consensus == "rank":  # at bfloat16 precision, ties by position: a recording's precision reorders no near-ties
        coarse = stacked.to(torch.bfloat16)
        return coarse.argsort(dim=-1, stable=True).argsort(dim=-1).double().mean(dim=0)
    raise ValueError(f"unknown consensus {consensus!r}")


def ask(loaded: LoadedModel, context: CompressedContext, question: str, settings: GenerationSettings | None = None,
        answer_prefix: str | None = None, on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Answer ``question`` on the compressed ``context``; afterwards the context is as before.

    ``answer_prefix`` is fed after the template's tail, as the start of the answer (not repeated in
    the result). ``on_text`` receives the answer as it is produced.
    """
    ids = question_ids(loaded.tokenizer, question, context.tail, answer_prefix)
    result = ask_ids(loaded, context, ids, settings, on_text)
    result.stats = {"question": question} | result.stats
    return result


def ask_ids(loaded: LoadedModel, context: CompressedContext, ids: list[int], settings: GenerationSettings | None = None,
            on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """:func:`ask` for a question already tokenised (template tail and answer prefix included)."""
    settings = settings or GenerationSettings()
    settings.validate()
    total = context.context_tokens + len(ids)
    limit = context_length(loaded.model.config)
    if total + settings.max_new_tokens > limit:
        raise PromptError(f"the context ({context.context_tokens} tokens), the question ({len(ids)}) and "
                          f"{settings.max_new_tokens} new tokens exceed the model's context of {limit} tokens")
    device = loaded.device
    input_ids = torch.tensor([ids], device=device)
    mask = torch.ones(1, total, dtype=torch.long, device=device)
    positions = torch.arange(context.context_tokens, total, device=device)[None]
    stream = TextStream(loaded.tokenizer)

    def emit(tokens: torch.Tensor) -> None:
        if on_text is not None and int(tokens[0]) >= 0 and (delta := stream.push(int(tokens[0]))):
            on_text(delta)

    meter = PeakMemory(device)
    meter.start()
    try:
        with context.policy.resume(loaded.model, context.cache) as cache, torch.inference_mode():
            out = feed_and_generate(loaded.model, cache, input_ids, mask, positions, settings, eos_token_ids(loaded),
                                    emit)
    finally:
        context.restore()  # the answer's tokens are dropped, whatever happened
    if on_text is not None and (rest := stream.flush()):
        on_text(rest)
    loop = LoopOutput(out.tokens, out.prefill_seconds, out.decode_seconds, out.kv_cache_bytes,
                      full_kv_cache_bytes(loaded.model.config, 1, out.tokens_seen, loaded.model.dtype),
                      context.summary())
    return result_of(loaded, context.policy, out.tokens[0], total, loop, meter.peak())
