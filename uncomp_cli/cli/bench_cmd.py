"""``uncomp bench``: speed and memory of each cache method against the full cache, as a table or JSON."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.common import handle_errors
from uncomp_cli.cli.options import CONTEXT_SCORER_HELP, ModelOptions, with_method_options, with_settings

DEFAULT_METHODS = "full,snapkv,uncomp"
DEFAULT_LENGTHS = "1k,4k"
DEFAULT_BUDGETS = "5%"


@dataclass(frozen=True)
class BenchGrid:
    """The configurations measured: methods × budgets × prompt lengths × batch sizes."""

    methods: Annotated[
        str, typer.Option(help="Comma-separated methods; full is always run, first. name@B runs one at budget B only.")
    ] = DEFAULT_METHODS
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens: 4096, 4k (k = 1024).")] = DEFAULT_LENGTHS
    budgets: Annotated[
        str, typer.Option(help="KV budgets for the compressed methods: 5% of the prompt, or tokens (128).")
    ] = DEFAULT_BUDGETS
    batch_sizes: Annotated[
        str | None, typer.Option("--batch-sizes", help="Prompts per forward pass, comma-separated (default 1).")
    ] = None


@dataclass(frozen=True)
class BenchRuns:
    """How each configuration is run and timed."""

    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per prompt (EOS ignored).")] = 32
    warmup: Annotated[int, typer.Option(help="Untimed runs of each configuration first.")] = 1
    repeats: Annotated[int, typer.Option(help="Timed runs of each configuration; medians are reported.")] = 3
    seed: Annotated[int, typer.Option(help="Seed of the prompts (and of random weights).")] = 0


@dataclass(frozen=True)
class BenchModes:
    """Real text instead of random ids, and the throughput and context-reuse modes."""

    haystack: Annotated[
        Path | None, typer.Option(help="Folder of .txt files: prompts are slices of its text instead of random ids.")
    ] = None
    memory_cap: Annotated[
        str | None,
        typer.Option(help="Throughput mode: per method, the largest batch whose peak memory fits (8GiB, 512MiB, 8G)."),
    ] = None
    max_batch: Annotated[int, typer.Option(help="With --memory-cap: the largest batch size tried.")] = 1024
    context_reuse: Annotated[
        bool,
        typer.Option("--context-reuse", help="Reuse mode: per length, save each method's compressed context and "
                     "time a question on it (file load included) against a full prefill of the same prompt."),
    ] = False
    context_scorer: Annotated[
        str | None,
        typer.Option(help=f"With --context-reuse: how context tokens are scored: {CONTEXT_SCORER_HELP}; a gate's "
                     "one-off training is not timed."),
    ] = None
    kv_bits: Annotated[
        int | None,
        typer.Option(help="With --context-reuse: 8 holds each compressed context rounded to 8 bits (the full "
                     "cache is not)."),
    ] = None


@dataclass(frozen=True)
class RandomModelOptions:
    """A model of a known architecture with random weights, for speed alone."""

    model_config: Annotated[
        str | None,
        typer.Option(help="A random-initialised model with real shapes instead (speed only): llama3-8b, "
                     "llama3.2-1b, mistral-7b, qwen2-0.5b, qwen2-7b, tiny."),
    ] = None
    layers: Annotated[int | None, typer.Option(help="With --model-config: keep only the first N layers.")] = None


@handle_errors
@with_method_options(exclude=("budget",))
@with_settings(grid=BenchGrid, runs=BenchRuns, modes=BenchModes, loading=ModelOptions, random_model=RandomModelOptions)
def bench(
    profile: Annotated[
        Path | None, typer.Option(help="UNComp profile for the profile methods (default: as 'uncomp generate').")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON results to this file (atomically).")] = None,
    *,
    grid: BenchGrid,
    runs: BenchRuns,
    modes: BenchModes,
    loading: ModelOptions,
    random_model: RandomModelOptions,
    method_options: dict,
) -> None:
    """Time to first token, prefill, decode speed, KV bytes and peak memory of each method, against full."""
    from uncomp_cli.bench.results import BenchSettings
    from uncomp_cli.errors import UncompError
    from uncomp_cli.units import parse_batch_sizes, parse_lengths, parse_memory, split_list

    model_config = random_model.model_config
    if modes.memory_cap is not None and grid.batch_sizes is not None:
        raise UncompError("--memory-cap searches the batch size itself; drop --batch-sizes")
    if model_config is not None and loading.model is not None:
        raise UncompError("give either --model or --model-config, not both")
    if random_model.layers is not None and model_config is None:
        raise UncompError("--layers is for --model-config")
    if model_config is not None and modes.haystack is not None:
        raise UncompError("--haystack needs a tokenizer; random models (--model-config) take random token ids")
    settings = BenchSettings(
        methods=split_list(grid.methods, "--methods"),
        lengths=parse_lengths(grid.lengths),
        budgets=split_list(grid.budgets, "--budgets"),
        batch_sizes=parse_batch_sizes(grid.batch_sizes or "1"),
        new_tokens=runs.new_tokens,
        warmup=runs.warmup,
        repeats=runs.repeats,
        seed=runs.seed,
        haystack=None if modes.haystack is None else str(modes.haystack),
        profile=None if profile is None else str(profile),
        memory_cap=None if modes.memory_cap is None else parse_memory(modes.memory_cap),
        max_batch=modes.max_batch,
        reuse=modes.context_reuse,
        context_scorer=modes.context_scorer,
        kv_bits=modes.kv_bits,
        method_options=method_options,
    )
    settings.validate()  # before the model loads: bad input fails fast
    loaded = _load(loading, random_model, settings)
    report = _run(loaded, settings)
    data = report.to_dict()
    text = json.dumps(data, ensure_ascii=False, indent=1)
    if out is not None:
        from uncomp_cli.files import atomic_write

        atomic_write(out, text + "\n")
    from rich.console import Console

    from uncomp_cli.bench.render import render_report

    if json_output:
        sys.stdout.write(text + "\n")
    # The table is the result without --json, a courtesy on stderr with it; wide enough not to wrap in a pipe.
    stream = sys.stderr if json_output else sys.stdout
    render_report(report, Console(file=stream, width=None if stream.isatty() else 200))


def _load(loading: ModelOptions, random_model: RandomModelOptions, settings):
    """A real model, or a random one of a preset's shapes (lengths and memory checked before allocating)."""
    model_config, layers = random_model.model_config, random_model.layers
    if model_config is not None:
        from uncomp_cli.bench.runner import check_lengths
        from uncomp_cli.models.random_presets import load_random_model, preset_config

        check_lengths(preset_config(model_config, layers), settings)

        return load_random_model(model_config, layers, device=loading.device, dtype=loading.dtype, seed=settings.seed)
    return loading.load()


def _run(loaded, settings):
    """run_bench with a progress bar on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from uncomp_cli.bench.runner import run_bench
    from uncomp_cli.cli.common import stderr_console

    stderr_console.print(f"bench: {loaded.name} on {loaded.device}", style="dim", highlight=False)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=stderr_console, transient=True) as progress:
        task = progress.add_task("bench", total=None)

        def advance(done: int, total: int, what: str) -> None:
            progress.update(task, completed=done, total=total, description=what)

        return run_bench(loaded, settings, on_progress=advance)
