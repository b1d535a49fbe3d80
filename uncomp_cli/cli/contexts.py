"""Compressed contexts on the command line: where the context and the questions come from, and how
the answers are printed (shared by ``generate --context…`` and ``compress``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from uncomp_cli.cli.common import read_stdin, read_text
from uncomp_cli.errors import PromptError, UncompError


@dataclass
class ContextItem:
    """A JSONL batch line with a context and its questions (``generate --input``)."""

    context: str
    questions: list[str]
    system: str | None = None
    raw: bool = False
    max_new_tokens: int | None = None
    label: str = ""

    @classmethod
    def from_record(cls, record: dict, label: str) -> ContextItem:
        context, questions = record.get("context"), record.get("questions")
        if not isinstance(context, str) or not context.strip():
            raise PromptError(f"{label}: 'context' must be a non-empty string")
        if (not isinstance(questions, list) or not questions
                or not all(isinstance(q, str) and q.strip() for q in questions)):
            raise PromptError(f"{label}: 'questions' must be a list of non-empty strings")
        return cls(context, questions, record.get("system"), bool(record.get("raw")), record.get("max_new_tokens"),
                   label)


def context_text(context: str | None, context_file: Path | None) -> str | None:
    """The context to compress: ``--context -`` (stdin) or ``--context-file``; None when neither."""
    if context is not None and context_file is not None:
        raise UncompError("give the context either with --context or with --context-file, not both")
    if context_file is not None:
        return read_text(context_file, "context file")
    if context == "-":
        return read_stdin()
    return None


def read_questions(prompt: str | None, questions: list[str] | None, questions_file: Path | None) -> list[str]:
    """The questions for a context: the prompt argument, each ``--question``, then each non-empty
    line of ``--questions-file``, in that order."""
    found = [prompt] if prompt is not None else []
    found += list(questions or [])
    if questions_file is not None:
        found += [line for line in read_text(questions_file, "questions file").splitlines() if line.strip()]
    if not found:
        raise PromptError("no question for the context: give one as the prompt, with --question or --questions-file")
    for question in found:
        if not question.strip():
            raise PromptError("a question is empty")
    return found


def print_answers(loaded, context, questions: list[str], settings, answer_prefix: str | None,
                  json_output: bool, stream: bool) -> None:
    """Answer each question on ``context``: text (streamed, a blank line between answers) or one JSON
    object a line with the question, the answer, its timings and the context's statistics."""
    from uncomp_cli.contexts.compress import ask

    def write(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    streaming = stream and not json_output
    for number, question in enumerate(questions):
        if number and not json_output:
            typer.echo("")  # a blank line between answers
        result = ask(loaded, context, question, settings, answer_prefix=answer_prefix,
                     on_text=write if streaming else None)
        if json_output:
            typer.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            typer.echo("" if streaming else result.text)
    if "budget_note" in context.stats:
        typer.echo(f"note: {context.stats['budget_note']}", err=True)
