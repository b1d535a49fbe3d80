"""``uncomp generate --method adakv``: the command runs it, reports it, and refuses a bad floor."""

from __future__ import annotations

from generate_cli import PROMPT, as_json, run


def test_adakv_runs_reports_its_settings_and_holds_fewer_bytes(tiny_model_dir):
    common = ["-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 4, "--json"]
    data = as_json(run(*common, "--method", "adakv", "--budget", "40", "--floor", "0.3", "--window", "8",
                       "--kernel", "3"))
    assert data["method"] == "adakv" and data["budget"] == "40" and data["floor"] == 0.3
    assert data["kv_budget_tokens"] == 40
    assert data["kv_cache_bytes"] < 0.6 * data["full_kv_cache_bytes"]
    full = as_json(run(*common))
    same = as_json(run(*common, "--method", "adakv", "--budget", "100%"))
    assert same["text"] == full["text"] and same["kv_cache_bytes"] == full["kv_cache_bytes"]


def test_a_floor_outside_0_1_exits_2_with_one_line(tiny_model_dir):
    result = run("-m", tiny_model_dir, "hello", "--method", "adakv", "--floor", "1.5")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --floor must be a share between 0 and 1, got 1.5"
    assert result.stdout == ""
