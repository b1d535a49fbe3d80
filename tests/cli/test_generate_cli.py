"""``uncomp generate`` through the real CLI: exit codes, one-line errors, clean stdout."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from uncomp_cli.cli.app import app

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, ["generate", *map(str, args)], input=input)


def test_json_output_has_the_documented_fields(tiny_model_dir):
    result = run("-m", tiny_model_dir, "hello world", "--max-new-tokens", 5, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("text", "prompt_tokens", "new_tokens", "prefill_seconds", "decode_tokens_per_second",
                "kv_cache_bytes", "full_kv_cache_bytes", "peak_memory_bytes", "model", "device", "dtype"):
        assert key in data
    assert 0 < data["new_tokens"] <= 5
    assert data["kv_cache_bytes"] == data["full_kv_cache_bytes"] > 0
    assert data["device"] == "cpu" and data["dtype"] == "float32" and data["method"] == "full"


def test_streamed_text_equals_no_stream_text(tiny_model_dir):
    streamed = run("-m", tiny_model_dir, "hello world", "--max-new-tokens", 8)
    plain = run("-m", tiny_model_dir, "hello world", "--max-new-tokens", 8, "--no-stream")
    as_json = run("-m", tiny_model_dir, "hello world", "--max-new-tokens", 8, "--json")
    assert streamed.exit_code == plain.exit_code == 0
    assert streamed.stdout == plain.stdout == json.loads(as_json.stdout)["text"] + "\n"


def test_dash_reads_stdin_and_piped_stdin_joins_the_argument(tiny_model_dir):
    from_stdin = run("-m", tiny_model_dir, "-", "--raw", "--max-new-tokens", 3, "--json", input="hello world")
    joined = run("-m", tiny_model_dir, "fox", "--raw", "--max-new-tokens", 3, "--json", input="hello world")
    assert json.loads(from_stdin.stdout)["prompt_tokens"] < json.loads(joined.stdout)["prompt_tokens"]


def test_prompt_file(tiny_model_dir, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("hello world")
    by_file = run("-m", tiny_model_dir, "--prompt-file", path, "--max-new-tokens", 3, "--json")
    by_arg = run("-m", tiny_model_dir, "hello world", "--max-new-tokens", 3, "--json")
    assert json.loads(by_file.stdout)["text"] == json.loads(by_arg.stdout)["text"]


@pytest.mark.parametrize("args, stdin, message", [
    (["hi", "-m", "./no/such/model"], None, "error: unknown model './no/such/model'"),
    ([""], None, "error: the prompt is empty"),
    (["-"], b"\xff\xfe\x00bad", "error: standard input is not valid UTF-8 text"),
    (["hi", "--prompt-file", "/no/such/file.txt"], None, "error: prompt file not found"),
    (["hi", "--device", "gpu7"], None, "error: invalid device 'gpu7'"),
    (["hi", "--dtype", "float8"], None, "error: invalid dtype 'float8'"),
])
def test_bad_input_gives_one_line_and_exit_2(tiny_model_dir, args, stdin, message):
    if "-m" not in args:
        args = [*args, "-m", tiny_model_dir]
    result = run(*args, input=stdin)
    assert result.exit_code == 2
    assert result.stderr.startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_over_long_prompt_names_both_lengths_and_truncate_middle_fits(tiny_model_dir):
    long_prompt = "hello world " * 1500
    result = run("-m", tiny_model_dir, long_prompt, "--raw", "--max-new-tokens", 4)
    assert result.exit_code == 2
    assert "but the model's context is 2048 tokens" in result.stderr and "--truncate middle" in result.stderr
    ok = run("-m", tiny_model_dir, long_prompt, "--raw", "--max-new-tokens", 4, "--truncate", "middle", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["prompt_tokens"] == 2048 - 4


@pytest.mark.parametrize("args", [["--max-new-tokens", "0"], ["--max-new-tokens", "many"],
                                  ["--top-p", "1.5"], ["--truncate", "left"]])
def test_invalid_numbers_and_choices_exit_2(tiny_model_dir, args):
    result = run("-m", tiny_model_dir, "hi", *args)
    assert result.exit_code == 2
    assert result.stdout == ""


def test_version_and_help_are_instant():
    assert runner.invoke(app, ["--version"]).stdout.startswith("uncomp ")
    assert "--max-new-tokens" in runner.invoke(app, ["generate", "--help"]).stdout
