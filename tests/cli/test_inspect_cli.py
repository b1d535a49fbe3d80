"""``uncomp inspect-heads``: human report, JSON, CSV, plot, on-the-fly calibration and bad profiles."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import typer
from safetensors.torch import save_file
from tiny import tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from uncomp_cli.cli import calibrate_cmd, calibration, inspect_cmd
from uncomp_cli.profile.calibrate import calibrate
from uncomp_cli.profile.calibration_text import CalibrationText, token_windows
from uncomp_cli.profile.file import save_profile
from uncomp_cli.profile.report import CSV_COLUMNS

TEXT = "The capital of France is Paris. Hello world, the quick brown fox jumps over the lazy dog. " * 40


def make_app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False, rich_markup_mode=None)

    @app.callback()
    def _root() -> None:
        """uncomp (test app)"""

    app.command("calibrate")(calibrate_cmd.calibrate)
    app.command("inspect-heads")(inspect_cmd.inspect_heads)
    return app


def invoke(*args):
    return CliRunner().invoke(make_app(), [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_loaded():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    return SimpleNamespace(
        model=model, tokenizer=tokenizer, name="tiny-llama", device=torch.device("cpu"), dtype=torch.float32
    )


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory, tiny_loaded):
    windows = token_windows(CalibrationText((TEXT,), "test text"), tiny_loaded.tokenizer, samples=3, seq_len=64)
    profile = calibrate(tiny_loaded.model, windows, model_name="tiny-llama", stage_threshold=0.0)
    return save_profile(profile, tmp_path_factory.mktemp("profiles") / "tiny.safetensors")


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {message}"
    assert result.stdout == ""


def test_human_report_shows_heatmap_stages_groups_and_extremes(profile_path):
    result = invoke("inspect-heads", profile_path, "--top", 3)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith("tiny-llama: 4 layers × 4 query heads (2 KV heads), head size 16")
    assert "stages (ε = 0): 0: layers 0–" in out and "keep 100%" in out
    assert "q0" in out and "q3" in out and "g1" in out
    assert "highest-entropy heads (top 3)" in out and "lowest-entropy heads (bottom 3)" in out


def test_json_report_lists_every_head(profile_path):
    result = invoke("inspect-heads", profile_path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["heads"]) == 4 * 4
    assert report["profile"]["model"] == "tiny-llama"
    assert [s["stage"] for s in report["stages"]] == list(range(len(report["stages"])))
    highest = report["highest"][0]["entropy"]
    assert highest == max(h["entropy"] for h in report["heads"])
    assert report["lowest"][0]["entropy"] == min(h["entropy"] for h in report["heads"])


def test_csv_report_has_one_row_per_head(profile_path):
    result = invoke("inspect-heads", profile_path, "--csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 16
    assert {(int(r["layer"]), int(r["head"])) for r in rows} == {(layer, h) for layer in range(4) for h in range(4)}
    assert all(r["kv_head"] == str(int(r["head"]) // 2) for r in rows)


def test_plot_without_matplotlib_is_one_clear_line(profile_path, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    out = tmp_path / "heads.png"
    assert_one_line_error(
        invoke("inspect-heads", profile_path, "--plot", out),
        "--plot needs matplotlib: pip install 'uncomp[plot]'",
    )
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) not installed")
def test_plot_writes_a_png(profile_path, tmp_path):
    out = tmp_path / "heads.png"
    result = invoke("inspect-heads", profile_path, "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_on_the_fly_report_saves_nothing(tmp_path, monkeypatch, tiny_loaded):
    monkeypatch.setattr(calibration, "_load_model", lambda spec, device, dtype: tiny_loaded)
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    result = invoke("inspect-heads", "--model", "tiny", "--data", data, "--samples", 2, "--seq-len", 32, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["profile"]["samples"] == "2" and str(data) in report["profile"]["calibration_data"]
    assert [p.name for p in tmp_path.iterdir()] == ["text.txt"]


def test_bad_profiles_are_one_line_errors(tmp_path, profile_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(profile_path.read_bytes()[:500])
    assert_one_line_error(
        invoke("inspect-heads", truncated),
        f"{truncated} is not a readable safetensors file (truncated or corrupt)",
    )
    weights = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(weights))
    assert_one_line_error(
        invoke("inspect-heads", weights),
        f"{weights} is a safetensors file but not an uncomp profile (no 'uncomp-profile' metadata)",
    )
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert_one_line_error(
        invoke("inspect-heads", text), f"{text} is not a readable safetensors file (truncated or corrupt)"
    )
    missing = tmp_path / "absent.safetensors"
    assert_one_line_error(invoke("inspect-heads", missing), f"profile not found: {missing}")


def test_usage_errors(profile_path):
    assert_one_line_error(
        invoke("inspect-heads"), "give a PROFILE file, or --model and/or --data to calibrate on the fly"
    )
    assert_one_line_error(
        invoke("inspect-heads", profile_path, "--model", "x"),
        "give either a PROFILE or --model/--data to calibrate on the fly, not both",
    )
    assert_one_line_error(invoke("inspect-heads", profile_path, "--json", "--csv"), "choose one of --json and --csv")


def test_spearman_matches_a_hand_computation_with_ties():
    from uncomp_cli.profile.report import spearman

    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ranks a = [0, 1.5, 1.5, 3], b = [0, 1, 2, 3]: Pearson of the ranks = 4.5 / sqrt(4.5 · 5)
    expected = 4.5 / (4.5 * 5) ** 0.5
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(expected)


def test_compare_two_profiles(profile_path, tmp_path, tiny_loaded):
    from uncomp_cli.profile.file import load_profile

    same = invoke("inspect-heads", profile_path, "--compare", profile_path, "--json")
    assert same.exit_code == 0, same.output
    result = json.loads(same.stdout)
    assert result["spearman_heads"] == 1.0 and result["kv_group_agreement"] == 1.0 and result["same_stages"]
    flipped = load_profile(profile_path)
    flipped.head_entropy = -flipped.head_entropy
    other = save_profile(flipped, tmp_path / "flipped.safetensors")
    human = invoke("inspect-heads", profile_path, "--compare", other)
    assert human.exit_code == 0, human.output
    assert "Spearman over all heads: -1.000" in human.stdout
    assert_one_line_error(
        invoke("inspect-heads", profile_path, "--compare", other, "--csv"),
        "--compare prints a summary (text or --json), not CSV",
    )


def test_comparing_profiles_of_different_models_is_refused(profile_path, tmp_path, tiny_loaded):
    model = tiny_model("llama-mha", vocab_size=len(tiny_loaded.tokenizer))
    windows = token_windows(CalibrationText((TEXT,), "test text"), tiny_loaded.tokenizer, samples=1, seq_len=32)
    other = save_profile(calibrate(model, windows, model_name="tiny-mha"), tmp_path / "mha.safetensors")
    assert_one_line_error(
        invoke("inspect-heads", profile_path, "--compare", other),
        "the profiles are for different models: tiny-llama (4 layers × 4 query heads / 2 KV heads) "
        "vs tiny-mha (4 layers × 4 query heads / 4 KV heads)",
    )
