"""``uncomp generate``: text from a prompt, streamed to stdout; ``--json`` for pipelines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from uncomp_cli.cli.common import handle_errors
from uncomp_cli.errors import PromptError


def read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """Join the prompt argument, ``--prompt-file`` and piped stdin, as the ``llm`` tool does.

    ``-`` as the prompt means "read stdin"; stdin that is not a terminal is appended after the
    argument (so ``cat doc.txt | uncomp generate "Summarise:"`` works).
    """
    parts: list[str] = []
    if prompt_file is not None:
        try:
            parts.append(prompt_file.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise PromptError(f"prompt file not found: {prompt_file}") from None
        except UnicodeDecodeError:
            raise PromptError(f"prompt file {prompt_file} is not valid UTF-8 text") from None
    if prompt is not None and prompt != "-":
        parts.append(prompt)
    if prompt == "-" or (not sys.stdin.isatty() and prompt_file is None):
        try:
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        except OSError:
            data = b""
        try:
            piped = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PromptError("standard input is not valid UTF-8 text") from None
        if piped.strip():
            # Piped text comes first when a prompt argument is given too: "<document> <instruction>".
            parts = [piped, *parts] if prompt not in (None, "-") else [*parts, piped]
    text = "\n".join(p.rstrip("\n") for p in parts)
    if not text.strip():
        raise PromptError("the prompt is empty: pass it as an argument, with --prompt-file, or on stdin")
    return text


@handle_errors
def generate(
    prompt: Annotated[str | None, typer.Argument(help="The prompt; '-' reads stdin. Piped stdin is joined to it.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="Read the prompt from a file.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", envvar="UNCOMP_MODEL",
                                              help="smollm2-135m (default), a model folder, a .gguf, or a hub id.")] = None,
    system: Annotated[str | None, typer.Option(help="System message (chat models).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Pass the prompt exactly as given: no chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy (default).")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling threshold.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    truncate: Annotated[str, typer.Option(help="none: error on over-long prompts; middle: cut the middle.")] = "none",
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Print text as it is generated.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with text and statistics.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
) -> None:
    """Generate text from a prompt (full KV cache)."""
    from uncomp_cli.generate import GenerationSettings
    from uncomp_cli.generate import generate as run_generate
    from uncomp_cli.models import load_model
    from uncomp_cli.prompting import TRUNCATE_MODES

    if truncate not in TRUNCATE_MODES:
        raise typer.BadParameter(f"use one of {', '.join(TRUNCATE_MODES)}", param_hint="--truncate")
    text = read_prompt(prompt, prompt_file)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    settings.validate()
    loaded = load_model(model, device=device, dtype=dtype)
    streaming = stream and not json_output

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    result = run_generate(loaded, text, settings, system=system, raw=raw, truncate=truncate,
                          on_text=write if streaming else None)
    if json_output:
        typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
    elif streaming:
        sys.stdout.write("\n")
    else:
        typer.echo(result.text)
