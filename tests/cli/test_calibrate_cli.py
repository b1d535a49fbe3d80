"""``uncomp calibrate`` through the CLI runner, on a tiny random model standing in for the loader."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import typer
from tiny import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from uncomp_cli.cli import calibrate_cmd, calibration, inspect_cmd
from uncomp_cli.profile.file import load_profile

TEXT = "The capital of France is Paris. Hello world, the quick brown fox jumps over the lazy dog. " * 40


def make_app() -> typer.Typer:
    """The two commands registered as in uncomp_cli/cli/app.py."""
    app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.callback()
    def _root() -> None:
        """uncomp (test app)"""

    app.command("calibrate")(calibrate_cmd.calibrate)
    app.command("inspect-heads")(inspect_cmd.inspect_heads)
    return app


@pytest.fixture(scope="module")
def tiny_loaded():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    return SimpleNamespace(
        model=model, tokenizer=tokenizer, name="tiny-llama", device=torch.device("cpu"), dtype=torch.float32
    )


@pytest.fixture
def loads(monkeypatch, tiny_loaded):
    """Replace model loading; the list records every (spec, device, dtype) asked for."""
    calls = []

    def fake_load(spec, device, dtype):
        calls.append((spec, device, dtype))
        return tiny_loaded

    monkeypatch.setattr(calibration, "_load_model", fake_load)
    return calls


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def invoke(*args, input=None):
    return CliRunner().invoke(make_app(), [str(a) for a in args], input=input)


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {message}"
    assert "Traceback" not in result.output


def test_calibrate_writes_a_profile_and_prints_a_summary(tmp_path, loads, text_file):
    out = tmp_path / "tiny.safetensors"
    result = invoke("calibrate", "--data", text_file, "--samples", 3, "--seq-len", 64, "--out", out, "--model", "tiny")
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert (profile.samples, profile.seq_len, profile.num_layers, profile.num_kv_heads) == (3, 64, 4, 2)
    assert profile.entropy_rank_k == 4 and profile.groups == 2 and profile.model == "tiny-llama"
    assert str(text_file) in profile.calibration_data
    assert f"profile: {out}" in result.stdout
    assert "stages" in result.stdout and "head groups: 2" in result.stdout
    assert "calibrating" in result.stderr  # the progress bar goes to stderr
    assert loads == [("tiny", "auto", "auto")]


def test_json_summary_and_options_reach_the_profile(tmp_path, loads, text_file):
    out = tmp_path / "p.safetensors"
    result = invoke(
        "calibrate",
        text_file,
        "--samples",
        2,
        "--seq-len",
        32,
        "--out",
        out,
        "--json",
        "--rank-k",
        8,
        "--groups",
        1,
        "--source",
        "key",
        "--stage-threshold",
        0.5,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["profile"] == str(out)
    assert summary["metadata"]["entropy_rank_k"] == "8" and summary["metadata"]["entropy_source"] == "key"
    profile = load_profile(out)
    assert profile.groups == 1 and profile.stage_threshold == 0.5 and profile.num_stages == 1


def test_builtin_source_when_no_data_is_given(tmp_path, loads):
    out = tmp_path / "p.safetensors"
    result = invoke("calibrate", "--samples", 2, "--seq-len", 64, "--out", out)
    assert result.exit_code == 0, result.output
    assert load_profile(out).calibration_data.startswith("built-in: Python")


def test_stdin_and_globs_combine(tmp_path, loads, text_file):
    out = tmp_path / "p.safetensors"
    result = invoke(
        "calibrate",
        "--data",
        "-",
        "--data",
        str(tmp_path / "*.txt"),
        "--samples",
        2,
        "--seq-len",
        64,
        "--out",
        out,
        input=TEXT,
    )
    assert result.exit_code == 0, result.output
    assert "stdin" in load_profile(out).calibration_data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--samples", "0"], "--samples must be at least 1 (got 0)"),
        (["--seq-len", "1"], "--seq-len must be at least 2 tokens (got 1)"),
        (["--source", "value"], "--source must be one of query, key (got 'value')"),
        (["--stage-threshold", "-1"], "--stage-threshold must be zero or positive (got -1.0)"),
        (["--kv-aggregation", "median"], "--kv-aggregation must be one of mean, max (got 'median')"),
    ],
)
def test_bad_options_fail_before_loading_the_model(tmp_path, loads, text_file, args, message):
    out = tmp_path / "p.safetensors"
    result = invoke("calibrate", "--data", text_file, "--out", out, *args)
    assert_one_line_error(result, message)
    assert loads == [] and not out.exists()


def test_missing_and_binary_data(tmp_path, loads):
    out = tmp_path / "p.safetensors"
    missing = tmp_path / "absent.txt"
    assert_one_line_error(
        invoke("calibrate", "--data", missing, "--out", out), f"calibration data not found: {missing}"
    )
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(
        invoke("calibrate", "--data", binary, "--out", out),
        f"{binary} is not text (binary data); calibration needs UTF-8 text",
    )
    assert loads == [] and not out.exists()


def test_settings_the_model_cannot_take(tmp_path, loads, text_file):
    out = tmp_path / "p.safetensors"
    base = ["calibrate", "--data", text_file, "--samples", 2, "--seq-len", 32, "--out", out]
    assert_one_line_error(invoke(*base, "--rank-k", 17), "--rank-k 17 is larger than the head size 16; use 1 to 16")
    assert_one_line_error(
        invoke(*base, "--groups", 3), "--groups 3 is not possible with 2 KV heads per layer; use 1 to 2"
    )
    assert not out.exists()


def test_too_little_text_says_how_much_is_needed(tmp_path, loads):
    small = tmp_path / "small.txt"
    small.write_text("just a few words")
    out = tmp_path / "p.safetensors"
    result = invoke("calibrate", "--data", small, "--samples", 4, "--seq-len", 512, "--out", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: not enough calibration text: 4 samples × 512 tokens need 2,048 tokens")
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_out_must_be_a_writable_file_path(tmp_path, loads, text_file):
    assert_one_line_error(
        invoke("calibrate", "--data", text_file, "--out", tmp_path),
        f"--out {tmp_path} is a folder; give a file name such as {tmp_path / 'profile.safetensors'}",
    )
    nowhere = tmp_path / "missing" / "p.safetensors"
    assert_one_line_error(
        invoke("calibrate", "--data", text_file, "--out", nowhere),
        f"--out {nowhere}: folder {nowhere.parent} does not exist",
    )
    assert loads == []


def test_an_existing_profile_survives_a_failed_run(tmp_path, loads, text_file):
    out = tmp_path / "p.safetensors"
    assert invoke("calibrate", "--data", text_file, "--samples", 2, "--seq-len", 32, "--out", out).exit_code == 0
    before = out.read_bytes()
    result = invoke("calibrate", "--data", text_file, "--samples", 2, "--seq-len", 32, "--out", out, "--rank-k", 99)
    assert result.exit_code == 2
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors", "text.txt"]


def test_the_cli_default_threshold_is_the_library_default():
    from uncomp_cli.profile.calibrate import DEFAULT_STAGE_THRESHOLD

    defaults = {parameter.name: parameter.default for parameter in calibration.CALIBRATION_OPTIONS}
    assert defaults["stage_threshold"] == DEFAULT_STAGE_THRESHOLD


def test_the_uncomp_app_registers_both_commands():
    from uncomp_cli.cli.app import app

    for command in ("calibrate", "inspect-heads"):
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert "--data" in result.stdout
