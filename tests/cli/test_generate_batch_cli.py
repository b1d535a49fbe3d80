"""``uncomp generate --input``: JSONL in, JSONL out in input order, bad lines stop the run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from uncomp_cli.cli.app import app

runner = CliRunner()
LINES = [
    {"prompt": "hello world", "id": "first"},
    {"prompt": "the quick brown fox jumps over the lazy dog", "max_new_tokens": 2},
    {"prompt": "capital", "raw": True},
]


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_batch_results_come_in_input_order_and_match_single_runs(tiny_model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(jsonl(LINES[:1]) + "\n" + jsonl(LINES[1:]))
    result = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--input", str(path),
                                 "--max-new-tokens", "5", "--batch-size", "2"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["first", 3, 4]  # ids default to line numbers
    assert rows[1]["new_tokens"] <= 2
    for record, row in zip(LINES, rows):
        args = ["generate", "-m", str(tiny_model_dir), record["prompt"], "--json",
                "--max-new-tokens", str(record.get("max_new_tokens", 5))] + (["--raw"] if record.get("raw") else [])
        alone = json.loads(runner.invoke(app, args).stdout)
        assert row["text"] == alone["text"] and row["prompt_tokens"] == alone["prompt_tokens"]


def test_output_file_is_written_and_stdout_stays_empty(tiny_model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--input", "-", "--output", str(out),
                                 "--max-new-tokens", "3"], input=jsonl(LINES))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert len(out.read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', "error: stdin line 2: no 'prompt' string field"),
    ('{"prompt": "ok"}\nnot json\n', "error: stdin line 2: not valid JSON"),
    ('{"prompt": "ok", "max_new_tokens": 0}\n', "error: stdin line 1: 'max_new_tokens' must be a positive integer"),
    ('{"prompt": "  "}\n', "error: stdin line 1: the prompt is empty"),
    ("\n\n", "error: stdin has no prompts"),
])
def test_a_bad_line_stops_the_run_before_any_output(tiny_model_dir, tmp_path, content, message):
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "--input", "-", "--output", str(out)],
                           input=content)
    assert result.exit_code == 2
    assert result.stderr.strip() == message or result.stderr.startswith(message)
    assert not out.exists()


def test_input_and_a_prompt_together_are_refused(tiny_model_dir):
    result = runner.invoke(app, ["generate", "-m", str(tiny_model_dir), "hi", "--input", "-"], input="")
    assert result.exit_code == 2
