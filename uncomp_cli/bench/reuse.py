"""Context reuse: a question on a saved compressed context against a full prefill of the same prompt.

For each prompt length and method × budget: the context is compressed once and saved to a file,
and what making it cost is reported against a full-cache prefill of the same context timed just
before it (``make_context_over_prefill``: the prefill, any re-reading and the selection, over the
prefill alone); then, repeatedly, the time from the start — loading the file, checks included — to
the first token of a question on it, against the time to the first token of a full-cache prefill of
the context followed by the same question, measured alternately in the same run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from uncomp_cli.bench.measure import PromptSource, ratio
from uncomp_cli.bench.results import BenchSettings
from uncomp_cli.contexts.compress import ask_ids, compress_ids
from uncomp_cli.contexts.file import load_context, save_context
from uncomp_cli.defaults import DEFAULT_CONTEXT_SCORER
from uncomp_cli.engine.generation import GenerationSettings, generate_ids
from uncomp_cli.models.prompting import question_ids
from uncomp_cli.policies.full import FullCachePolicy
from uncomp_cli.policies.grid import Cell

#: The question asked of every context (random models, which have no tokenizer, get 16 random ids).
QUESTION = "What is the main point of the text above?"
FIRST_TOKEN = GenerationSettings(max_new_tokens=1)


@dataclass
class ReuseRow:
    """One method × budget × length: the saved context's cost and its time to a first token against full."""

    method: str
    budget: str | None
    length: int
    question_tokens: int
    compress_seconds: float  # make the compressed context: prefill, any re-reading, the selection
    prefill_full_seconds: float  # a full-cache prefill of the same context, timed just before
    file_bytes: int
    kv_cache_bytes: int
    ttft_reuse_seconds: float  # load the file, feed the question, pick the first token
    ttft_full_seconds: float  # prefill context + question with the full cache, pick the first token
    ttft_vs_full: float | None = None
    make_context_over_prefill: float | None = None  # compress_seconds / prefill_full_seconds
    context_scorer: str | None = None  # how the context's tokens were scored (None: the method does not score)
    kv_bits: int | None = None  # 8: the compressed context was held rounded to 8 bits


def _question(loaded, prompts: PromptSource) -> list[int]:
    if loaded.tokenizer is not None:
        return question_ids(loaded.tokenizer, QUESTION, "")
    generator = torch.Generator().manual_seed(prompts.seed + 1)
    return torch.randint(0, prompts.vocab_size, (16,), generator=generator).tolist()


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def run_reuse(loaded, settings: BenchSettings, cases: Sequence[Cell], policies: Sequence, prompts: PromptSource,
              on_progress: Callable[[int, int, str], None] | None = None) -> list[ReuseRow]:
    """Measure every length × case of ``settings`` (medians over ``settings.repeats`` after ``warmup``)."""
    question = _question(loaded, prompts)
    device = loaded.device
    scorer = settings.context_scorer or DEFAULT_CONTEXT_SCORER
    if scorer == "gate" and any(policy.selects_by_attention for policy in policies):
        from uncomp_cli.contexts.gate import gate_for

        gate_for(loaded)  # trained once per model and cached: not part of any context's cost
    rows: list[ReuseRow] = []
    total, done = len(settings.lengths) * len(cases), 0
    with tempfile.TemporaryDirectory(prefix="uncomp-reuse-") as folder:
        for length in settings.lengths:
            context = prompts.ids(1, length)[0].tolist()
            whole = torch.tensor([context + question], device=device)

            def prefill(context=context) -> None:
                compress_ids(loaded, context, FullCachePolicy())

            if settings.warmup:
                prefill()
            for case, policy in zip(cases, policies):
                prefill_seconds = _seconds(prefill, device)
                started = time.perf_counter()
                kv_bits = None if case.method == "full" else settings.kv_bits
                compressed = compress_ids(loaded, context, policy, scorer, kv_bits=kv_bits)  # synchronises first
                compress_seconds = time.perf_counter() - started
                path = save_context(compressed, loaded, Path(folder) / f"{case.method}-{length}.uncomp")

                def reuse(path=path) -> None:
                    ask_ids(loaded, load_context(loaded, path), question, FIRST_TOKEN)

                def full(whole=whole) -> None:
                    generate_ids(loaded.model, whole, torch.ones_like(whole), FIRST_TOKEN, eos_ids=[])

                timings: list[tuple[float, float]] = []
                for round_ in range(settings.warmup + settings.repeats):
                    pair = (_seconds(reuse, device), _seconds(full, device))
                    if round_ >= settings.warmup:
                        timings.append(pair)
                row = ReuseRow(case.method, case.budget, length, len(question), compress_seconds, prefill_seconds,
                               path.stat().st_size, compressed.kv_cache_bytes(),
                               statistics.median(t[0] for t in timings), statistics.median(t[1] for t in timings))
                row.ttft_vs_full = ratio(row.ttft_reuse_seconds, row.ttft_full_seconds)
                row.make_context_over_prefill = ratio(compress_seconds, prefill_seconds)
                row.context_scorer = compressed.stats.get("context_scorer")
                row.kv_bits = kv_bits
                rows.append(row)
                done += 1
                if on_progress is not None:
                    on_progress(done, total, f"reuse {case.label} · {length} tokens")
    return rows
