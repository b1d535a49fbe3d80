"""``uncomp bench`` through the CLI: JSON on stdout and nothing else, the table, --out, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from uncomp_cli.cli.app import app

runner = CliRunner()
TINY = ["--model-config", "tiny", "--layers", "2", "--new-tokens", "3", "--warmup", "0", "--repeats", "1"]


def run(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_json_is_all_that_stdout_carries(tmp_path):
    out = tmp_path / "bench.json"
    result = run(*TINY, "--methods", "full,snapkv", "--lengths", "64", "--budgets", "40", "--json", "--out", out)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # the whole of stdout is one JSON document
    assert data["model"] == "random tiny, 2 of 4 layers (not trained weights; speed only)"
    assert [(r["method"], r["budget"], r["length"]) for r in data["rows"]] == [("full", None, 64), ("snapkv", "40", 64)]
    assert data["rows"][0]["prefill_vs_full"] == 1.0
    assert json.loads(out.read_text()) == data
    assert "method" in result.stderr  # the table goes to stderr with --json


def test_without_json_stdout_has_the_table_and_names_the_random_model():
    result = run(*TINY, "--methods", "full", "--lengths", "64")
    assert result.exit_code == 0, result.stderr
    assert "random tiny, 2 of 4 layers (not trained weights; speed only)" in result.stdout
    assert "prefill s" in result.stdout and "full" in result.stdout


def test_a_real_model_folder_with_haystack_prompts(tiny_model_dir, haystack_dir):
    result = run("-m", tiny_model_dir, "--methods", "full,snapkv@100%", "--lengths", "80", "--new-tokens", "3",
                 "--warmup", "0", "--repeats", "1", "--haystack", haystack_dir, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["random_weights"] is False and data["prompts"].startswith("haystack")
    assert [r["kv_cache_vs_full"] for r in data["rows"]] == [1.0, 1.0]  # a 100 % budget keeps every token


def test_memory_cap_mode_reports_the_largest_batch():
    result = run(*TINY, "--methods", "full", "--lengths", "64", "--memory-cap", "4GiB", "--max-batch", "2", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["throughput"][0]
    assert row["max_batch_size"] == 2 and row["throughput_vs_full"] == 1.0


@pytest.mark.parametrize("args, message", [
    (["--methods", "full,nope"], "unknown method"),
    (["--lengths", "99999"], "context"),
    (["--lengths", "4q"], "is not a length in tokens"),
    (["--memory-cap", "8XB"], "invalid memory size"),
    (["--memory-cap", "8"], "invalid memory size"),
    (["--batch-sizes", "0"], "batch sizes"),
    (["--memory-cap", "1GiB", "--batch-sizes", "2"], "--batch-sizes"),
    (["--budgets", "16", "--lengths", "256"], "observation window"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--model-config", "llama9"], "unknown model config"),
    (["--layers", "0"], "--layers"),
    (["--haystack", "."], "--haystack"),
    (["--methods", "full", "--profile", "p.safetensors"], "--profile"),
    (["--methods", "full,snapkv", "--sinks", "4"], "--sinks applies to streamingllm, not full, snapkv"),
    (["--context-scorer", "gate"], "--context-scorer is for --context-reuse"),
    (["--context-reuse", "--context-scorer", "oracle"], "window, reconstruct, gate"),
    (["--kv-bits", "8"], "--kv-bits is for --context-reuse"),
    (["--context-reuse", "--kv-bits", "4"], "--kv-bits must be 8 (or left out), got 4"),
])
def test_bad_input_is_one_error_line_and_exit_2(args, message):
    base = ["--model-config", "tiny", "--lengths", "64", "--budgets", "40"]
    result = run(*base, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_layers_without_a_model_config_and_both_models_are_errors(tiny_model_dir):
    for args in (["--layers", "2"], ["-m", tiny_model_dir, "--model-config", "tiny"]):
        result = run(*args)
        assert result.exit_code == 2 and result.stderr.startswith("error:")


def test_an_8b_model_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    from uncomp_cli.models import random_presets as model_configs

    monkeypatch.setattr(model_configs, "available_memory_bytes", lambda device: 24 * 2**30)
    result = run("--model-config", "llama3-8b", "--dtype", "float32", "--device", "cpu", "--lengths", "1k")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "random llama3-8b needs 29." in result.stderr
