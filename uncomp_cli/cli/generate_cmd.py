"""``uncomp generate``: text from a prompt, streamed to stdout; ``--json`` for pipelines."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.common import handle_errors, read_stdin, read_text
from uncomp_cli.cli.options import CONTEXT_SCORER_HELP, METHOD_NAMES, ModelOptions, with_method_options, with_settings
from uncomp_cli.defaults import DEFAULT_CONTEXT_SCORER, DEFAULT_METHOD
from uncomp_cli.errors import PromptError, UncompError


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """Join the prompt argument, ``--prompt-file`` and piped stdin, as the ``llm`` tool does.

    ``-`` as the prompt means "read stdin"; stdin that is not a terminal is appended after the
    argument (so ``cat doc.txt | uncomp generate "Summarise:"`` works).
    """
    parts: list[str] = []
    if prompt_file is not None:
        parts.append(read_text(prompt_file, "prompt file"))
    if prompt is not None and prompt != "-":
        parts.append(prompt)
    if prompt == "-" or (not sys.stdin.isatty() and prompt_file is None):
        piped = read_stdin()
        if piped.strip():
            # Piped text comes first when a prompt argument is given too: "<document> <instruction>".
            parts = [piped, *parts] if prompt not in (None, "-") else [*parts, piped]
    text = "\n".join(p.rstrip("\n") for p in parts)
    if not text.strip():
        raise PromptError("the prompt is empty: pass it as an argument, with --prompt-file, or on stdin")
    return text


def read_batch(source: str) -> list:
    """Parse JSONL prompts (``-`` = stdin): one object per line with ``prompt``, or ``context`` and
    ``questions`` (a list: the context is compressed once, each question answered on it), and
    optional ``system``, ``raw``, ``max_new_tokens``, ``id``. Any bad line stops the run before it starts."""
    from uncomp_cli.cli.contexts import ContextItem
    from uncomp_cli.engine.generation import BatchItem

    if source == "-":
        data = sys.stdin.buffer.read()
        name = "stdin"
    else:
        try:
            data = Path(source).read_bytes()
        except FileNotFoundError:
            raise PromptError(f"input file not found: {source}") from None
        name = source
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PromptError(f"{name} is not valid UTF-8 text") from None
    items, ids = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise PromptError(f"{name} line {number}: not valid JSON") from None
        if not isinstance(record, dict):
            raise PromptError(f"{name} line {number}: not a JSON object")
        limit = record.get("max_new_tokens")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise PromptError(f"{name} line {number}: 'max_new_tokens' must be a positive integer")
        if "context" in record:
            items.append(ContextItem.from_record(record, f"{name} line {number}"))
            ids.append(record.get("id", number))
            continue
        if not isinstance(record.get("prompt"), str):
            raise PromptError(f"{name} line {number}: no 'prompt' string field (or 'context' with 'questions')")
        items.append(
            BatchItem(
                prompt=record["prompt"],
                system=record.get("system"),
                raw=bool(record.get("raw")),
                max_new_tokens=limit,
                label=f"{name} line {number}",
            )
        )
        ids.append(record.get("id", number))
    if not items:
        raise PromptError(f"{name} has no prompts")
    return list(zip(ids, items))


@dataclass(frozen=True)
class PromptOptions:
    """Where the prompt comes from besides its argument, and how it is put to the model."""

    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="Read the prompt from a file.")] = None
    system: Annotated[str | None, typer.Option(help="System message (chat models).")] = None
    raw: Annotated[bool, typer.Option("--raw", help="Pass the prompt exactly as given: no chat template.")] = False
    truncate: Annotated[str, typer.Option(help="none: error on over-long prompts; middle: cut the middle.")] = "none"


@dataclass(frozen=True)
class SamplingOptions:
    """How many tokens to generate and how to pick them."""

    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (default).")] = 0.0
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling threshold.")] = 1.0
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None

    def settings(self):
        """The checked :class:`~uncomp_cli.engine.generation.GenerationSettings`."""
        from uncomp_cli.engine.generation import GenerationSettings

        settings = GenerationSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                      top_p=self.top_p, seed=self.seed)
        settings.validate()
        return settings


@dataclass(frozen=True)
class InputOutputOptions:
    """How results are printed, and the JSONL batch mode (``--input``, ``--output``)."""

    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is generated.")] = True
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object with text and statistics.")
    ] = False
    input_path: Annotated[
        str | None,
        typer.Option(
            "--input",
            help="JSONL prompts, one {\"prompt\": ...} per line ('-' = stdin); writes JSONL results in input order.",
        ),
    ] = None
    output: Annotated[
        Path | None, typer.Option(help="With --input: write the JSONL results here (atomically) instead of stdout.")
    ] = None
    batch_size: Annotated[int, typer.Option(min=1, help="With --input: prompts per forward pass.")] = 8


@dataclass(frozen=True)
class ContextOptions:
    """A context compressed once, apart from the questions, and the questions asked on it: with
    ``--context-file`` or ``--context``, every question is answered on the same compressed cache."""

    context: Annotated[
        str | None,
        typer.Option(help="A compressed context file from 'uncomp compress' to ask questions on, or '-' to read "
                     "the context text from stdin (compressed first, apart from the questions)."),
    ] = None
    context_file: Annotated[
        Path | None,
        typer.Option(help="A text file to compress once as the context; the prompt and each --question are "
                     "asked on it, each on the same compressed cache."),
    ] = None
    question: Annotated[
        list[str] | None, typer.Option("--question", "-q", help="A question on the context (repeatable).")
    ] = None
    questions_file: Annotated[Path | None, typer.Option(help="Questions on the context, one a line.")] = None
    answer_prefix: Annotated[
        str | None, typer.Option(help="With a context: the start of each answer, fed after the question.")
    ] = None
    context_scorer: Annotated[
        str | None, typer.Option(help=f"With --context-file/--context -: how context tokens are scored: "
                                 f"{CONTEXT_SCORER_HELP}.")
    ] = None
    kv_bits: Annotated[
        int | None, typer.Option(help="With --context-file/--context -: 8 stores the compressed context rounded to "
                                 "8 bits (about 0.56 of the bytes at bfloat16, 0.28 at float32).")
    ] = None

    @property
    def given(self) -> bool:
        """Whether there is a context (a text file, stdin or a compressed file)."""
        return self.context is not None or self.context_file is not None

    def check_unused(self) -> None:
        """Without a context, refuse the options that only apply to one."""
        if (self.question or self.questions_file is not None or self.answer_prefix is not None
                or self.context_scorer is not None or self.kv_bits is not None):
            raise UncompError("--question, --questions-file, --answer-prefix, --context-scorer and --kv-bits are for "
                              "a context (--context-file or --context)")


@handle_errors
@with_method_options()
@with_settings(prompting=PromptOptions, loading=ModelOptions, sampling=SamplingOptions, io=InputOutputOptions,
               on_context=ContextOptions)
def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; '-' reads stdin. Piped stdin is joined to it.")
    ] = None,
    method: Annotated[str, typer.Option(help=f"KV cache: {', '.join(METHOD_NAMES)}.")] = DEFAULT_METHOD,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="UNComp profile from 'uncomp calibrate' "
            "(default: the one cached for the model, calibrated once if missing)."
        ),
    ] = None,
    *,
    prompting: PromptOptions,
    loading: ModelOptions,
    sampling: SamplingOptions,
    io: InputOutputOptions,
    on_context: ContextOptions,
    method_options: dict,
) -> None:
    """Generate text from a prompt, with a full or a compressed KV cache.

    Method options (--budget, --window, --sinks…) apply to the methods that take them; giving one
    that --method does not take is an error. With --context-file or --context, the context is
    compressed once without the question, and every question is answered on it.
    """
    from uncomp_cli.engine.generation import generate as run_generate
    from uncomp_cli.models.prompting import TRUNCATE_MODES
    from uncomp_cli.policies.registry import make_policy, with_profile

    if prompting.truncate not in TRUNCATE_MODES:
        raise typer.BadParameter(f"use one of {', '.join(TRUNCATE_MODES)}", param_hint="--truncate")
    settings = sampling.settings()
    if on_context.given:
        _answer_on_context(prompt, on_context, settings, method, method_options, profile, loading, prompting, io)
        return
    on_context.check_unused()
    if io.input_path is not None:
        if prompt is not None or prompting.prompt_file is not None:
            raise typer.BadParameter("give prompts either with --input or as a prompt, not both", param_hint="--input")
        batch = read_batch(io.input_path)
    elif io.output is not None:
        raise typer.BadParameter("--output is for --input batches; redirect stdout instead", param_hint="--output")
    else:
        text = read_prompt(prompt, prompting.prompt_file)
    policy = make_policy(method, **method_options)  # before the model loads: bad settings fail fast
    if profile is not None and not policy.needs_profile:
        from uncomp_cli.policies.registry import profile_methods

        raise typer.BadParameter(f"--profile is for the methods {', '.join(profile_methods())}, not {method}",
                                 param_hint="--profile")
    loaded = loading.load()
    policy = with_profile(policy, loaded, profile)
    if io.input_path is not None:
        _run_batch(loaded, batch, settings, policy, prompting, io)
        return
    streaming = io.stream and not io.json_output

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = run_generate(
        loaded,
        text,
        settings,
        policy=policy,
        system=prompting.system,
        raw=prompting.raw,
        truncate=prompting.truncate,
        on_text=write if streaming else None,
    )
    if io.json_output:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    elif streaming:
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        typer.echo(result.text)
    if "budget_note" in result.stats:  # after the text's last line, so a terminal shows them apart
        typer.echo(f"note: {result.stats['budget_note']}", err=True)


def _answer_on_context(prompt: str | None, on_context: ContextOptions, settings, method: str, method_options: dict,
                       profile: Path | None, loading: ModelOptions, prompting: PromptOptions,
                       io: InputOutputOptions) -> None:
    """Compress the context once (or load a compressed one) and answer every question on it."""
    from uncomp_cli.cli.contexts import context_text, print_answers, read_questions
    from uncomp_cli.contexts.compress import check_context_scorer, compress_context
    from uncomp_cli.contexts.file import load_context
    from uncomp_cli.engine.quantise import check_kv_bits
    from uncomp_cli.policies.registry import make_policy, with_profile

    text = context_text(on_context.context, on_context.context_file)
    asked = read_questions(prompt, on_context.question, on_context.questions_file)
    context_scorer = check_context_scorer(on_context.context_scorer or DEFAULT_CONTEXT_SCORER)
    check_kv_bits(on_context.kv_bits)
    if text is None and on_context.kv_bits is not None:
        raise UncompError("a compressed context file keeps the bits it was compressed with; drop --kv-bits "
                          "(or compress the text again with it)")
    if text is None and (method != DEFAULT_METHOD or method_options or profile is not None):
        raise UncompError("a compressed context file brings its own method and settings; drop --method, its "
                          "options and --profile (or compress the text again with them)")
    policy = make_policy(method, **method_options) if text is not None else None  # bad settings fail fast
    loaded = loading.load()
    if text is None:
        compressed = load_context(loaded, Path(on_context.context))
    else:
        compressed = compress_context(loaded, text, with_profile(policy, loaded, profile), system=prompting.system,
                                      raw=prompting.raw, scorer=context_scorer, kv_bits=on_context.kv_bits)
    print_answers(loaded, compressed, asked, settings, on_context.answer_prefix, io.json_output, io.stream)


def _run_batch(loaded, batch, settings, policy, prompting: PromptOptions, io: InputOutputOptions) -> None:
    """Generate for every line with a progress bar on stderr; write results once, in input order.
    Prompt lines run in left-padded batches; a context line is compressed once and answers each of
    its questions (one result line each, with ``question_index``)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from uncomp_cli.cli.common import stderr_console
    from uncomp_cli.cli.contexts import ContextItem
    from uncomp_cli.contexts.compress import ask, compress_context
    from uncomp_cli.engine.generation import GenerationSettings, generate_batch
    from uncomp_cli.files import atomic_write

    for _, item in batch:  # command-line defaults for what a line does not set
        item.system = item.system if item.system is not None else prompting.system
        item.raw = item.raw or prompting.raw
    prompts = [index for index, (_, item) in enumerate(batch) if not isinstance(item, ContextItem)]
    results: dict[int, list] = {}
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=stderr_console, transient=True) as progress:
        task = progress.add_task("generate", total=len(batch))
        done = generate_batch(loaded, [batch[i][1] for i in prompts], settings, policy=policy,
                              batch_size=io.batch_size, truncate=prompting.truncate,
                              on_result=lambda index, result: progress.advance(task))
        results |= {index: [result] for index, result in zip(prompts, done)}
        for index, (_, item) in enumerate(batch):
            if isinstance(item, ContextItem):
                own = GenerationSettings(item.max_new_tokens or settings.max_new_tokens, settings.temperature,
                                         settings.top_p, settings.seed)
                context = compress_context(loaded, item.context, policy, system=item.system, raw=item.raw)
                results[index] = [ask(loaded, context, question, own) for question in item.questions]
                progress.advance(task)
    lines = []
    for index, (item_id, item) in enumerate(batch):
        for number, result in enumerate(results[index]):
            extra = {"question_index": number} if isinstance(item, ContextItem) else {}
            lines.append(json.dumps({"id": item_id, **extra, **result.to_dict()}, ensure_ascii=False) + "\n")
    if io.output is not None:
        atomic_write(io.output, "".join(lines))
    else:
        sys.stdout.write("".join(lines))
