"""What each cache method costs and saves, measured against the full cache in the same run.

:func:`run_bench` measures, for every method × prompt length × budget × batch size: time to first
token, prefill time, decode tokens/s over a fixed number of new tokens, the KV bytes held after
decoding and peak memory (:mod:`uncomp_cli.bench.measure`). Each number is the median over
repeats, with its spread, and is also given as a ratio to ``full`` measured in the same run: full
runs first for every length × batch, then the methods alternate within each repeat, so slow drift
of a shared machine hits every method alike. With a memory cap it instead finds, per method, the
largest batch whose peak memory stays under the cap (:func:`~uncomp_cli.bench.search.search_max_batch`)
and that batch's decode throughput.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
from collections.abc import Callable, Sequence

import torch

from uncomp_cli.bench.measure import TIME_MEASURE, PromptSource, RunSample, ratio, run_once
from uncomp_cli.bench.results import BenchReport, BenchRow, BenchSettings, ThroughputRow, summarize_runs
from uncomp_cli.bench.search import predict_peak, search_max_batch
from uncomp_cli.errors import UncompError
from uncomp_cli.memory import PeakMemory
from uncomp_cli.models.loading import LoadedModel
from uncomp_cli.policies.grid import Cell

log = logging.getLogger(__name__)


ProgressCallback = Callable[[int, int, str], None]


def check_lengths(config, settings: BenchSettings) -> None:
    """Every prompt length plus the new tokens must fit the model's context."""
    from uncomp_cli.models.prompting import context_length

    context = context_length(config)
    for length in settings.lengths:
        if length + settings.new_tokens > context:
            raise UncompError(f"a {length}-token prompt plus {settings.new_tokens} new tokens exceeds the model's "
                              f"context of {context} tokens")


def resolve_profile(loaded: LoadedModel, settings: BenchSettings, policies: Sequence):
    """The profile the profile methods use, and how it was obtained (for the report); (None, None) if none does.

    A given file; for a random model, :func:`~uncomp_cli.profile.reference.reference_profile` (its
    entropies mean nothing); otherwise the profile cached for the model, calibrated once if missing.
    """
    from uncomp_cli.profile.store import profile_for

    if not any(policy.needs_profile for policy in policies):
        return None, None
    if settings.profile is not None:
        return profile_for(loaded, settings.profile), f"file {settings.profile}"
    if loaded.source.kind == "random":
        from uncomp_cli.profile.reference import reference_profile

        profile = reference_profile(loaded.model.config, loaded.name)
        return profile, (f"reference structure for a random model: {profile.num_stages} prefill stages "
                         f"(official keep fractions), {profile.groups} KV-head groups; no calibration")
    return profile_for(loaded), "cached for the model (calibrated once on the built-in source if it was missing)"


def with_profiles(policies: Sequence, profile) -> list:
    """The policies ready to run: those that need a profile share ``profile``."""
    return [p.given(profile=profile) if p.needs_profile else p for p in policies]


def _meta(loaded: LoadedModel, settings: BenchSettings, meter: PeakMemory, prompts: PromptSource,
          profile_note: str | None) -> dict:
    import transformers

    device = loaded.device
    return {
        "model": loaded.name,
        "random_weights": loaded.source.kind == "random",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prompts": prompts.description,
        "new_tokens": settings.new_tokens,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "profile": profile_note,
        "method_options": settings.method_options,
        "memory_measure": meter.description,
        "time_measure": TIME_MEASURE,
        "memory_cap_bytes": settings.memory_cap,
        "load_average_before": _load_average(),  # other work on the machine skews every time
    }


def _load_average() -> float | None:
    """The 1-minute load average (None where unknown): a busy machine makes timings meaningless."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_bench(loaded: LoadedModel, settings: BenchSettings | None = None,
              on_progress: ProgressCallback | None = None) -> BenchReport:
    """Measure every configuration of ``settings`` on ``loaded``; ``on_progress(done, total, what)`` after each run."""
    settings = settings or BenchSettings()
    settings.validate()
    check_lengths(loaded.model.config, settings)
    cases = settings.cases()
    meter = PeakMemory(loaded.device)
    if settings.memory_cap is not None:
        if not meter.available:
            raise UncompError(f"--memory-cap needs a per-run memory measure, and {meter.description}")
        capacity = meter.capacity()
        if capacity is not None and settings.memory_cap > capacity:
            raise UncompError(f"--memory-cap {settings.memory_cap / 2**30:.1f} GiB is more than this {loaded.device} "
                              f"can hold ({capacity / 2**30:.1f} GiB)")
    prompts = PromptSource(loaded, settings.seed, settings.haystack)
    policies = settings.policies()
    profile, profile_note = resolve_profile(loaded, settings, policies)
    policies = with_profiles(policies, profile)
    report = BenchReport(meta=_meta(loaded, settings, meter, prompts, profile_note))
    if settings.reuse:
        from uncomp_cli.bench.reuse import run_reuse

        report.reuse = run_reuse(loaded, settings, cases, policies, prompts, on_progress)
    elif settings.memory_cap is None:
        report.rows = _grid(loaded, settings, cases, policies, prompts, meter, on_progress)
    else:
        report.throughput = _throughput(loaded, settings, cases, policies, prompts, meter, on_progress)
    report.meta["load_average_after"] = _load_average()
    return report


def _out_of_memory(case: Cell, length: int, batch: int) -> UncompError:
    return UncompError(f"out of memory running {case.label} on {length} tokens × batch {batch}; "
                       "lower --lengths or --batch-sizes")


def _grid(loaded, settings, cases, policies, prompts, meter, on_progress) -> list[BenchRow]:
    rows: list[BenchRow] = []
    per_cell = len(cases) * (settings.warmup + settings.repeats)
    total = len(settings.lengths) * len(settings.batch_sizes) * per_cell
    done = 0
    for length in settings.lengths:
        for batch in settings.batch_sizes:
            ids = prompts.ids(batch, length)
            samples: list[list[RunSample]] = [[] for _ in cases]
            for round_ in range(settings.warmup + settings.repeats):
                for index, (case, policy) in enumerate(zip(cases, policies)):
                    try:
                        sample = run_once(loaded.model, ids, policy, settings.new_tokens, meter)
                    except torch.cuda.OutOfMemoryError:
                        raise _out_of_memory(case, length, batch) from None
                    if round_ >= settings.warmup:
                        samples[index].append(sample)
                    done += 1
                    if on_progress is not None:
                        on_progress(done, total, f"{case.label} · {length} tokens × {batch}")
            cell = [summarize_runs(case, length, batch, settings.new_tokens, runs)
                    for case, runs in zip(cases, samples)]
            for row in cell:
                row.compare_to(cell[0])
            log.debug("%d tokens × %d: %s", length, batch,
                      ", ".join(f"{r.method} {r.prefill_seconds:.3f}s" for r in cell))
            rows.extend(cell)
    return rows


def _throughput(loaded, settings, cases, policies, prompts, meter, on_progress) -> list[ThroughputRow]:
    """Per length and case: warm up at batch 1, search the largest batch under the cap, then measure it."""
    cap = settings.memory_cap
    limit = meter.capacity()
    total = len(settings.lengths) * len(cases)
    results: list[ThroughputRow] = []
    done = 0
    for length in settings.lengths:
        cell: list[ThroughputRow] = []
        for case, policy in zip(cases, policies):
            seen: list[tuple[int, int]] = []

            def measure(batch: int, case=case, policy=policy, seen=seen, length=length) -> int | None:
                predicted = predict_peak(seen, batch)
                if limit is not None and predicted is not None and predicted > 0.95 * limit:
                    log.info("%s: skipping batch %d, predicted to need %.1f GiB of the %.1f GiB there is",
                             case.label, batch, predicted / 2**30, limit / 2**30)
                    return None
                try:
                    peak = run_once(loaded.model, prompts.ids(batch, length), policy, settings.new_tokens,
                                    meter).peak_memory_bytes
                except (torch.cuda.OutOfMemoryError, MemoryError):
                    gc.collect()
                    if loaded.device.type == "cuda":
                        torch.cuda.empty_cache()
                    return None
                seen.append((batch, peak))
                log.debug("%s: batch %d peaks at %d bytes", case.label, batch, peak)
                return peak

            for _ in range(settings.warmup):
                run_once(loaded.model, prompts.ids(1, length), policy, settings.new_tokens, meter)
            best, probes = search_max_batch(measure, cap, settings.max_batch)
            row = ThroughputRow(case.method, case.budget, length, cap, best, probes)
            if best:
                ids = prompts.ids(best, length)
                try:
                    runs = [run_once(loaded.model, ids, policy, settings.new_tokens, meter)
                            for _ in range(settings.repeats)]
                except torch.cuda.OutOfMemoryError:
                    raise _out_of_memory(case, length, best) from None
                row.measured = summarize_runs(case, length, best, settings.new_tokens, runs)
            cell.append(row)
            done += 1
            if on_progress is not None:
                on_progress(done, total, f"{case.label} · {length} tokens: batch {best}")
        full = cell[0]
        for row in cell:
            row.max_batch_vs_full = ratio(row.max_batch_size, full.max_batch_size)
            row.throughput_vs_full = ratio(row.decode_tokens_per_second, full.decode_tokens_per_second)
            if row.measured is not None and full.measured is not None:
                row.measured.compare_to(full.measured)
        results.extend(cell)
    return results
