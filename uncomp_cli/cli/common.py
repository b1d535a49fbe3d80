"""Helpers shared by the commands: one-line errors, the stderr console, logging to stderr, and
reading text (files, stdin) with one clear error.

Human numbers (``4k``, ``8GiB``) are parsed by :mod:`uncomp_cli.units`; shared options live in
:mod:`uncomp_cli.cli.options`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import typer
from rich.console import Console

from uncomp_cli.errors import PromptError, UncompError

F = TypeVar("F", bound=Callable)

#: Logs, progress bars and reports meant for people go to stderr; stdout carries results only.
stderr_console = Console(stderr=True)

EXIT_USAGE = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def handle_errors(command: F) -> F:
    """Turn :class:`UncompError` into one line on stderr and exit 2 (``UNCOMP_DEBUG=1`` re-raises)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UncompError as exc:
            if os.environ.get("UNCOMP_DEBUG"):
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file, or one clear error naming ``what`` it was meant to be."""
    try:
        return path.read_bytes().decode("utf-8")
    except (FileNotFoundError, IsADirectoryError):
        raise PromptError(f"{what} not found: {path}") from None
    except UnicodeDecodeError:
        raise PromptError(f"{what} {path} is not valid UTF-8 text") from None


def read_stdin() -> str:
    """Standard input as UTF-8 text ("" where it cannot be read)."""
    try:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    except OSError:
        data = b""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PromptError("standard input is not valid UTF-8 text") from None


def configure_logging() -> None:
    """uncomp's own log lines go to stderr; transformers' progress bars only with ``UNCOMP_DEBUG``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("uncomp: %(message)s"))
    logger = logging.getLogger("uncomp_cli")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if os.environ.get("UNCOMP_DEBUG") else logging.INFO)
    logger.propagate = False
    if not os.environ.get("UNCOMP_DEBUG"):
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        if "transformers" in sys.modules:  # already imported (library use, tests): the env is read too late
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
