"""Running ``uncomp generate`` in-process, for the command tests of the cache methods."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from uncomp_cli.cli.app import app

runner = CliRunner()
#: 120 tokens of plain text: long enough for small budgets to drop tokens on the tiny model.
PROMPT = "the quick brown fox jumps over the lazy dog " * 12


def run(*args, input=None):
    return runner.invoke(app, ["generate", *map(str, args)], input=input)


def as_json(result) -> dict:
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)
