"""One timed run of a policy, the statistics over repeats, and the prompts it runs on.

How it measures (docs/cli.md says the same for users): time with
:func:`~uncomp_cli.engine.generation.generate_ids`, the loop ``uncomp generate`` runs, with EOS
ignored so that every method decodes the same number of tokens; the device is synchronised before
each clock read. TTFT runs from the call (before the policy builds its cache) until the first new
token id is on the host; prefill is the prompt's forward pass with any selection, plus picking the
first token; decode tokens/s is batch × (new tokens − 1) / decode seconds. Memory: the per-run peak
of :class:`~uncomp_cli.memory.PeakMemory`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from uncomp_cli.engine.generation import GenerationSettings, LoopOutput, generate_ids
from uncomp_cli.errors import UncompError
from uncomp_cli.haystack import load_haystack
from uncomp_cli.memory import PeakMemory
from uncomp_cli.models.loading import LoadedModel

TIME_MEASURE = ("generate_ids with EOS ignored; device synchronised before each clock read; TTFT from the call to "
                "the first token on the host; decode tokens/s = batch x (new tokens - 1) / decode seconds")


@dataclass(frozen=True)
class Summary:
    """Repeated measurements of one number: the median and the spread, (max − min) / median."""

    median: float
    spread: float
    low: float
    high: float
    count: int


def summarize(samples: Sequence[float]) -> Summary:
    """Median and relative range of ``samples`` (spread 0 for one sample or a zero median)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("summarize needs at least one sample")
    median = statistics.median(values)
    low, high = min(values), max(values)
    spread = (high - low) / abs(median) if median else 0.0
    return Summary(median=median, spread=spread, low=low, high=high, count=len(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


@dataclass
class RunSample:
    """What one generation cost: the loop's own output (prefill and decode seconds, KV bytes, the
    policy's stats) plus what the bench adds. Times in seconds, memory in bytes."""

    loop: LoopOutput
    ttft_seconds: float
    decode_tokens_per_second: float
    peak_memory_bytes: int | None
    run_memory_bytes: int | None  # peak minus what was in use when the run started


def run_once(model: torch.nn.Module, input_ids: torch.Tensor, policy, new_tokens: int,
             meter: PeakMemory) -> RunSample:
    """Prefill ``input_ids`` [B, S] (no padding) and decode exactly ``new_tokens`` tokens per row."""
    first: list[float] = []

    def on_tokens(tokens: torch.Tensor) -> None:
        if not first:
            tokens.tolist()  # waits for the device: the first token is on the host
            first.append(time.perf_counter())

    at_start = meter.start()
    started = time.perf_counter()
    out = generate_ids(model, input_ids, torch.ones_like(input_ids), GenerationSettings(max_new_tokens=new_tokens),
                       eos_ids=[], policy=policy, on_tokens=on_tokens)
    peak = meter.peak()
    steps = input_ids.shape[0] * (new_tokens - 1)
    return RunSample(
        loop=out,
        ttft_seconds=first[0] - started,
        decode_tokens_per_second=steps / out.decode_seconds if out.decode_seconds > 0 else 0.0,
        peak_memory_bytes=peak,
        run_memory_bytes=None if peak is None or at_start is None else max(peak - at_start, 0),
    )


def random_prompt_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] token ids drawn uniformly from the vocabulary; row r is the same in every batch size."""
    rows = []
    for row in range(batch):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + length * 1_009 + row) % 2**63)
        rows.append(torch.randint(0, vocab_size, (length,), generator=generator))
    return torch.stack(rows)


def haystack_prompt_ids(tokens: Sequence[int], batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length]: row r is ``length`` consecutive tokens of the tokenised text from a seeded offset,
    wrapping around at the end (so any length is exact)."""
    if not tokens:
        raise UncompError("the haystack has no tokens")
    source = torch.as_tensor(list(tokens), dtype=torch.long)
    repeats = math.ceil((length + len(source)) / len(source))
    looped = source.repeat(repeats)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(source), (batch,), generator=generator).tolist()
    return torch.stack([looped[offset:offset + length] for offset in offsets])


class PromptSource:
    """Prompts of exact lengths: seeded random token ids, or slices of a tokenised haystack."""

    def __init__(self, loaded: LoadedModel, seed: int = 0, haystack: str | None = None):
        self.seed = seed
        self.vocab_size = int(loaded.model.config.vocab_size)
        self.device = loaded.device
        self.tokens: list[int] | None = None
        self.description = f"random token ids (seed {seed})"
        if haystack is not None:
            if loaded.tokenizer is None:
                raise UncompError("--haystack needs a model with a tokenizer; random models take random token ids")
            text = load_haystack(haystack)
            self.tokens = list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
            self.description = f"haystack {haystack} ({len(self.tokens)} tokens; seed {seed})"

    def ids(self, batch: int, length: int) -> torch.Tensor:
        if self.tokens is None:
            ids = random_prompt_ids(batch, length, self.vocab_size, self.seed)
        else:
            ids = haystack_prompt_ids(self.tokens, batch, length, self.seed)
        return ids.to(self.device)
