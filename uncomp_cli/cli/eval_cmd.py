"""``uncomp eval``: accuracy of cache methods × budgets on long-context suites, resumable.

Each command only builds its suite's examples; loading, the run grid, the results folder and the
report are shared (:func:`evaluate`). Like ``inspect-heads``, the human report (summary table and
heatmaps) is the result and goes to stdout; ``--json`` prints JSON there instead. Progress, skipped
runs and the results folder go to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.common import handle_errors, stderr_console
from uncomp_cli.cli.options import (
    CONTEXT_SCORER_HELP,
    Device,
    Dtype,
    Model,
    option,
    with_method_options,
    with_options,
    with_settings,
)
from uncomp_cli.errors import UncompError
from uncomp_cli.haystack import load_haystack
from uncomp_cli.units import parse_lengths, split_list

eval_app = typer.Typer(
    help="Evaluate cache methods and budgets on long-context tasks (needle, RULER-style, LongBench).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEFAULT_OUT = "uncomp-eval"  # uncomp_cli.eval.runner.DEFAULT_OUT, without importing torch for --help
DEFAULT_METHODS = "full,snapkv,uncomp"
# 2% of a 1k prompt (21 tokens) is under the default 32-token observation window: such a prompt is kept
# whole, so 2% only compresses from prompts of 1,551 tokens on.
DEFAULT_BUDGETS = "10%,5%"

# -- options every eval command shares ------------------------------------------------------------

#: The grid, the model and the output: every eval command takes them, as one ``grid`` dict.
GRID_OPTIONS = [
    option("methods", Annotated[str, typer.Option(
        help="Comma-separated cache methods; full runs once, without a budget.")], DEFAULT_METHODS),
    option("budgets", Annotated[str, typer.Option(
        help="Comma-separated budgets for every method but full: 10%, 5%, or 128.")], DEFAULT_BUDGETS),
    option("model", Model),
    option("profile", Annotated[Path | None, typer.Option(
        help="UNComp profile for the uncomp methods, ignored by the others "
             "(default: the cached one, calibrated once if missing).")]),
    option("batch_size", Annotated[int, typer.Option(help="Prompts per forward pass (left-padded).")], 1),
    option("out", Annotated[Path, typer.Option(
        help="Results go to a folder named by the settings under this one.")], Path(DEFAULT_OUT)),
    option("plot", Annotated[Path | None, typer.Option(
        help="Also write the heatmaps as an image (needs matplotlib: pip install 'uncomp[plot]').")]),
    option("json_output", Annotated[bool, typer.Option(
        "--json", help="Print a JSON summary on stdout instead of the tables.")], False),
    option("device", Device, "auto"),
    option("dtype", Dtype, "auto"),
    option("query_agnostic", Annotated[bool, typer.Option(
        "--query-agnostic", help="Compress each context before its question (once for all its questions), "
        "instead of the whole prompt with the question in it.")], False),
    option("context_scorer", Annotated[str | None, typer.Option(
        help=f"With --query-agnostic: how context tokens are scored: {CONTEXT_SCORER_HELP}.")]),
    option("kv_bits", Annotated[int | None, typer.Option(
        help="With --query-agnostic: 8 stores each compressed context rounded to 8 bits.")]),
]
Seed = Annotated[int, typer.Option(help="Seed for the generated prompts (needles, numbers, keys).")]


def eval_command(name: str):
    """Register an eval command with the grid options and the method options (budgets are the grid's)."""
    def register(command):
        return eval_app.command(name)(handle_errors(with_options("grid", GRID_OPTIONS)(
            with_method_options(exclude=("budget",))(command))))
    return register


# -- parsing --------------------------------------------------------------------------------------


def parse_depths(text: str, option: str = "--depths") -> list[float]:
    """Fractions of the context from 0 (start) to 1 (end)."""
    depths = []
    for item in split_list(text, option):
        try:
            value = float(item)
        except ValueError:
            value = -1.0
        if not 0 <= value <= 1:
            raise UncompError(f"{option}: {item!r} is not a depth between 0 and 1")
        depths.append(value)
    return sorted(dict.fromkeys(depths))


# -- the shared pipeline --------------------------------------------------------------------------


def evaluate(
    suite: str,
    build: Callable[[object], list],
    settings: dict,
    grid: dict,
    method_options: dict,
    panels: Callable[[object], list] = lambda result: [],
    longest: tuple[int, int] | None = None,
) -> None:
    """Check every option, load the model once, build the examples once, run the grid, report.

    build(loaded) -> examples; grid: the :data:`GRID_OPTIONS` values; panels(result) -> the
    heatmaps to show and plot (render.Grid); longest: (prompt tokens, answer tokens) of the longest
    example the suite will build, checked against the model's context before any prompt is built.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from uncomp_cli.eval.render import check_plot_path, plot_grids, render_eval
    from uncomp_cli.eval.runner import EvalSettings, run_eval
    from uncomp_cli.models.loading import load_model
    from uncomp_cli.models.prompting import context_length

    batch_size, profile, plot = grid["batch_size"], grid["profile"], grid["plot"]
    if batch_size < 1:
        raise UncompError(f"--batch-size must be at least 1, got {batch_size}")
    if grid["context_scorer"] is not None:
        from uncomp_cli.contexts.compress import check_context_scorer

        if not grid["query_agnostic"]:
            raise UncompError("--context-scorer is for --query-agnostic runs")
        check_context_scorer(grid["context_scorer"])
    if grid["kv_bits"] is not None:
        from uncomp_cli.engine.quantise import check_kv_bits

        if not grid["query_agnostic"]:
            raise UncompError("--kv-bits is for --query-agnostic runs")
        check_kv_bits(grid["kv_bits"])
    eval_settings = EvalSettings(
        suite, suite_settings=settings, methods=split_list(grid["methods"], "--methods"),
        budgets=split_list(grid["budgets"], "--budgets"), method_options=method_options, profile=profile,
        batch_size=batch_size, out=grid["out"], query_agnostic=grid["query_agnostic"],
        context_scorer=grid["context_scorer"], kv_bits=grid["kv_bits"])
    eval_settings.validate()  # before the model loads: a typo costs nothing
    if profile is not None and not profile.is_file():
        raise UncompError(f"profile not found: {profile}")
    if plot is not None:
        check_plot_path(plot)

    loaded = load_model(grid["model"], device=grid["device"], dtype=grid["dtype"])
    limit = context_length(loaded.model.config)
    if longest is not None and sum(longest) > limit:
        raise UncompError(f"--lengths {longest[0]}: the prompt and {longest[1]} tokens of answer are over "
                          f"{loaded.name}'s context of {limit} tokens")
    with stderr_console.status(f"building the {suite} prompts"):
        examples = build(loaded)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=stderr_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(run, done: int, total: int) -> None:
            if run.name not in tasks:
                tasks[run.name] = bar.add_task(run.name, total=total)
            bar.update(tasks[run.name], completed=done)

        result = run_eval(loaded, examples, eval_settings, progress=progress)

    heatmaps = panels(result)
    if plot is not None:
        plot_grids(result, heatmaps, plot)
        stderr_console.print(f"wrote {plot}")
    stderr_console.print(f"results in {result.folder}")
    if grid["json_output"]:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    else:
        render_eval(result, Console(), heatmaps)


# -- the commands ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeedleOptions:
    """The needles hidden in each prompt, and how they are asked for and answered."""

    distractors: Annotated[int, typer.Option(help="Other keys with their own numbers (multi-key needle).")] = 0
    needle_template: Annotated[
        str | None, typer.Option(help="The needle sentence, with {key} and {value}.")
    ] = None
    question_template: Annotated[str | None, typer.Option(help="The question, with {key}.")] = None
    answer_prefix: Annotated[
        str | None,
        typer.Option(help="Start of the answer, with {key} (default: the built-in one; none with custom templates)."),
    ] = None
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 12
    questions: Annotated[
        int, typer.Option(help="Hide this many keys in each context and ask each (multi-query; with "
                          "--query-agnostic every question is answered on one compressed context).")
    ] = 1


@eval_command("needle")
@with_settings(needles=NeedleOptions)
def needle(
    haystack: Annotated[
        Path, typer.Option(help="Folder of .txt files the needle is hidden in (e.g. ../shared/data/haystack).")
    ],
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated; k = 1024.")] = "1k,2k,4k",
    depths: Annotated[str, typer.Option(help="Needle depths from 0 (start) to 1 (end), comma-separated.")] = (
        "0,0.25,0.5,0.75,1"
    ),
    samples: Annotated[
        int, typer.Option(help="Prompts per length × depth cell, each with its own number, key and stretch of text.")
    ] = 1,
    seed: Seed = 0,
    *,
    needles: NeedleOptions,
    grid: dict | None = None,
    method_options: dict | None = None,
) -> None:
    """Needle in a haystack: a number hidden at each depth of prompts of each length; exact match.

    Shows a length × depth heatmap of exact match per method and budget.
    """
    from uncomp_cli.eval import needle as suite
    from uncomp_cli.eval.render import grids

    length_list = parse_lengths(lengths)
    depth_list = parse_depths(depths)
    templates = suite.make_templates(needles.needle_template, needles.question_template, needles.answer_prefix)
    distractors, questions, max_new_tokens = needles.distractors, needles.questions, needles.max_new_tokens
    suite.make_cases(length_list[:1], depth_list[:1], seed=seed, distractors=distractors,
                     samples=samples)  # checks --distractors and --samples
    if questions < 1 or questions > len(suite.KEYS) or (questions > 1 and distractors):
        raise UncompError(f"--questions must be 1 to {len(suite.KEYS)}, and is not combined with --distractors")
    text = load_haystack(haystack)
    settings = {
        "haystack": str(haystack.resolve()),
        "lengths": length_list,
        "depths": depth_list,
        "distractors": distractors,
        "samples": samples,
        "seed": seed,
        "templates": {"needle": templates.needle, "question": templates.question,
                      "answer_prefix": templates.answer_prefix},
        "max_new_tokens": max_new_tokens,
    }
    if questions > 1:  # only then: earlier folders keep their names
        settings["questions"] = questions

    def build(loaded) -> list:
        return suite.make_examples(loaded.tokenizer, text, length_list, depth_list, seed=seed,
                                   distractors=distractors, templates=templates, max_new_tokens=max_new_tokens,
                                   samples=samples, questions=questions)

    task = "multiquery" if questions > 1 else "multikey" if distractors else "needle"
    evaluate(task, build, settings, grid, method_options,
             panels=lambda result: grids(result, "length", "depth"), longest=(max(length_list), max_new_tokens))


@eval_command("ruler")
def ruler(
    tasks: Annotated[
        str,
        typer.Option(help="Comma-separated RULER tasks: niah_single, niah_multikey, niah_multivalue, "
                     "niah_multiquery, vt, cwe, fwe (default: all)."),
    ] = "all",
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated; k = 1024.")] = "1k,2k,4k",
    samples: Annotated[int, typer.Option(help="Prompts per task and length.")] = 5,
    haystack: Annotated[
        Path | None,
        typer.Option(help="Folder of .txt files to fill the needle tasks with (default: RULER's noise sentences)."),
    ] = None,
    seed: Seed = 0,
    grid: dict | None = None,
    method_options: dict | None = None,
) -> None:
    """RULER-style synthetic tasks (needles, variable tracking, common/frequent words), generated locally.

    Shows a task × length heatmap of the score per method and budget.
    """
    from uncomp_cli.eval import ruler as suite
    from uncomp_cli.eval.render import grids

    task_list = list(suite.TASKS) if tasks.strip() == "all" else split_list(tasks, "--tasks")
    unknown = [t for t in task_list if t not in suite.TASKS]
    if unknown:
        raise UncompError(f"unknown RULER task {unknown[0]!r}; known: {', '.join(suite.TASKS)}")
    if samples < 1:
        raise UncompError(f"--samples must be at least 1, got {samples}")
    length_list = parse_lengths(lengths)
    text = load_haystack(haystack) if haystack is not None else None
    settings = {"tasks": task_list, "lengths": length_list, "samples": samples, "seed": seed,
                "haystack": None if haystack is None else str(haystack.resolve())}

    def build(loaded) -> list:
        return suite.make_examples(loaded.tokenizer, task_list, length_list, samples, seed=seed, haystack=text)

    answer = max(suite.MAX_NEW_TOKENS[t] for t in task_list)
    evaluate("ruler", build, settings, grid, method_options, panels=lambda result: grids(result, "task", "length"),
             longest=(max(length_list), answer))


@eval_command("longbench")
def longbench(
    data: Annotated[
        Path, typer.Option(help="Folder of LongBench JSONL files named <task>.jsonl (or LongBench-E's <task>_e.jsonl).")
    ],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated tasks (file stems) to run (default: every .jsonl in --data).")
    ] = "all",
    max_length: Annotated[
        int, typer.Option(help="Longest prompt in tokens, chat template included; longer ones lose their middle.")
    ] = 3500,
    limit: Annotated[int | None, typer.Option(help="Only the first N examples of each task.")] = None,
    grid: dict | None = None,
    method_options: dict | None = None,
) -> None:
    """LongBench from your own JSONL files, scored with each task's LongBench metric.

    Shows a task × run table of scores.
    """
    from uncomp_cli.eval import longbench as suite
    from uncomp_cli.eval.render import task_grid
    from uncomp_cli.models.prompting import context_length

    if not data.is_dir():
        raise UncompError(f"LongBench folder not found: {data}")
    # "all" becomes the file stems, so the folder's settings name the tasks and `--tasks` in the same
    # order finds the same results.
    task_list = sorted(f.stem for f in data.glob("*.jsonl")) if tasks.strip() == "all" else split_list(tasks, "--tasks")
    if not task_list:
        raise UncompError(f"no .jsonl files in {data} (LongBench files are named <task>.jsonl, e.g. hotpotqa.jsonl)")
    if max_length < 1:
        raise UncompError(f"--max-length must be at least 1, got {max_length}")
    if limit is not None and limit < 1:
        raise UncompError(f"--limit must be at least 1, got {limit}")
    settings = {"data": str(data.resolve()), "tasks": task_list, "max_length": max_length, "limit": limit}

    def build(loaded) -> list:
        return suite.load_examples(data, loaded.tokenizer, tasks=task_list, max_length=max_length, limit=limit,
                                   context_length=context_length(loaded.model.config))

    evaluate("longbench", build, settings, grid, method_options, panels=lambda result: [task_grid(result)])
