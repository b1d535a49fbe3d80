"""``uncomp eval``: results folders and files, resuming, JSON and human output, and one-line errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from uncomp_cli.cli import eval_cmd
from uncomp_cli.cli.app import app

runner = CliRunner()
# Small enough for the tiny model: 2 prompts of ~256 tokens, 3 new tokens each.
NEEDLE = ["--lengths", "256", "--depths", "0,1", "--max-new-tokens", "3", "--window", "8", "--kernel", "3"]


def invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def full_only(args: list) -> list:
    """``args`` without the selection options, which ``full`` does not take (and the CLI refuses)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--window", "--kernel"):
            skip = True
        else:
            out.append(arg)
    return out


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {message}"
    assert result.stdout == ""


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, haystack_dir, tiny_profile, tmp_path_factory):
    """One needle grid (full, snapkv, uncomp at one budget) with --json; later tests resume it."""
    out = tmp_path_factory.mktemp("eval")
    args = ["needle", "-m", tiny_model_dir, "--haystack", haystack_dir, *NEEDLE, "--methods", "full,snapkv,uncomp",
            "--budgets", "64", "--profile", tiny_profile, "--out", out, "--json"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return args, out, result


def test_json_summary_is_all_of_stdout_and_the_files_hold_the_runs(first_run):
    args, out, result = first_run
    summary = json.loads(result.stdout)
    folder = Path(summary["folder"])
    assert folder.parent == out and folder.name.startswith("needle-") and summary["suite"] == "needle"
    assert [r["run"] for r in summary["runs"]] == ["full", "snapkv-64", "uncomp-64"]
    config = json.loads((folder / "config.json").read_text())
    assert config["settings"]["lengths"] == [256] and config["settings"]["depths"] == [0.0, 1.0]
    assert config["examples"] == 2 and config["selection"]["window"] == 8
    for run in summary["runs"]:
        rows = [json.loads(line) for line in (folder / run["run"] / "predictions.jsonl").read_text().splitlines()]
        metrics = json.loads((folder / run["run"] / "metrics.json").read_text())
        assert [r["id"] for r in rows] == ["needle-256-0", "needle-256-1"]
        assert all(r["new_tokens"] <= 3 and r["answers"][0].isdigit() for r in rows)
        for key in ("score", "exact_match", "rouge1_recall"):
            mean = sum(r["scores"][key] for r in rows) / len(rows)
            assert metrics["overall"][key] == pytest.approx(mean, abs=1e-6) == run["overall"][key]
        assert set(metrics["by_depth"]) == {"0", "1"} and set(metrics["by_length"]) == {"256"}
        assert not run["skipped"]
    ratios = {run["run"]: run["kv_bytes_vs_full"] for run in summary["runs"]}
    assert ratios["full"] == 1.0 and ratios["snapkv-64"] < 0.5 and ratios["uncomp-64"] < 0.5
    assert "results in" in result.stderr


def test_the_same_invocation_again_skips_every_run_and_rewrites_nothing(first_run):
    args, out, result = first_run
    folder = Path(json.loads(result.stdout)["folder"])
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["folder"] == str(folder) and all(run["skipped"] for run in summary["runs"])
    assert summary["runs"] == [run | {"skipped": True} for run in json.loads(result.stdout)["runs"]]
    assert again.stderr.count("finished earlier, skipped") == 3
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()} == files


def test_query_agnostic_results_are_resumed_only_under_the_same_context_selection(tiny_model_dir, haystack_dir,
                                                                                    tmp_path, monkeypatch):
    """The constants that decide what a compressed context keeps (whole words, shared tokens, the
    ranking's weights) name the results folder, so results made under others are not reused."""
    from uncomp_cli.contexts import compress

    args = ["needle", "-m", tiny_model_dir, "--haystack", haystack_dir, *NEEDLE, "--methods", "snapkv",
            "--budgets", "64", "--query-agnostic", "--out", tmp_path, "--json"]
    first = json.loads(invoke(*args).stdout)
    config = json.loads((Path(first["folder"]) / "config.json").read_text())
    assert config["context_selection"] == compress.selection_settings()
    again = json.loads(invoke(*args).stdout)
    assert again["folder"] == first["folder"] and all(run["skipped"] for run in again["runs"])
    monkeypatch.setattr(compress, "WHOLE_WORDS", not compress.WHOLE_WORDS)
    other = json.loads(invoke(*args).stdout)
    assert other["folder"] != first["folder"] and not any(run["skipped"] for run in other["runs"])


def test_8_bit_contexts_get_their_own_folder_and_hold_fewer_bytes(tiny_model_dir, haystack_dir, tmp_path):
    args = ["needle", "-m", tiny_model_dir, "--haystack", haystack_dir, *NEEDLE, "--methods", "full,snapkv",
            "--budgets", "64", "--query-agnostic", "--out", tmp_path, "--json"]
    plain = json.loads(invoke(*args).stdout)
    rounded = json.loads(invoke(*args, "--kv-bits", 8).stdout)
    assert rounded["folder"] != plain["folder"]
    assert json.loads((Path(rounded["folder"]) / "config.json").read_text())["kv_bits"] == 8

    def kv_bytes(summary: dict, run: str) -> float:
        metrics = json.loads((Path(summary["folder"]) / run / "metrics.json").read_text())
        return metrics["kv_cache_bytes_mean"]

    assert kv_bytes(rounded, "full") == kv_bytes(plain, "full")  # the reference is never rounded
    assert kv_bytes(rounded, "snapkv-64") < 0.5 * kv_bytes(plain, "snapkv-64")
    refused = invoke(*[a for a in args if a != "--query-agnostic"], "--kv-bits", 8)
    assert refused.exit_code == 2 and "--kv-bits is for --query-agnostic runs" in refused.stderr


def test_a_changed_setting_gets_its_own_folder_and_a_new_budget_joins_the_old_one(first_run):
    args, out, result = first_run
    folder = json.loads(result.stdout)["folder"]
    seeded = json.loads(invoke(*full_only(args), "--seed", 1, "--methods", "full").stdout)
    assert seeded["folder"] != folder and not seeded["runs"][0]["skipped"]
    wider = json.loads(invoke(*args, "--methods", "full,snapkv", "--budgets", "64,96").stdout)
    assert wider["folder"] == folder
    assert [(r["run"], r["skipped"]) for r in wider["runs"]] == [("full", True), ("snapkv-64", True),
                                                                ("snapkv-96", False)]


def test_policy_options_reach_the_runs_and_name_their_own_folder(first_run):
    args, out, result = first_run
    folder = json.loads(result.stdout)["folder"]
    summary = json.loads(invoke(*args, "--methods", "uncomp", "--decode-evict", "--prefill-keep", "0.5").stdout)
    assert summary["folder"] != folder
    config = json.loads((Path(summary["folder"]) / "config.json").read_text())
    assert config["selection"]["decode_evict"] is True and config["selection"]["prefill_keep"] == "0.5"
    policy = json.loads((Path(summary["folder"]) / "uncomp-64" / "metrics.json").read_text())["policy"]
    assert policy["decode_evict"] is True and policy["prefill_keep"] == [0.5]


def test_samples_give_each_cell_several_prompts_and_the_heatmap_their_mean(first_run):
    args, out, result = first_run
    summary = json.loads(invoke(*full_only(args), "--methods", "full", "--samples", 2).stdout)
    folder = Path(summary["folder"])
    assert str(folder) != json.loads(result.stdout)["folder"]
    assert json.loads((folder / "config.json").read_text())["settings"]["samples"] == 2
    rows = [json.loads(line) for line in (folder / "full" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["needle-256-0", "needle-256-0-s1", "needle-256-1", "needle-256-1-s1"]
    metrics = json.loads((folder / "full" / "metrics.json").read_text())
    assert metrics["by_depth"]["0"]["examples"] == 2 and metrics["overall"]["examples"] == 4


def test_human_report_has_the_summary_and_a_heatmap_per_run(first_run):
    args, out, result = first_run
    human = invoke(*[a for a in args if a != "--json"])
    assert human.exit_code == 0, human.output
    text = human.stdout
    assert "needle on" in text and "snapkv-64 *" in text and "exact_match" in text
    assert text.count("length \\ depth") == 3  # one heatmap per run
    assert "finished earlier" not in text and "results in" in human.stderr  # logs stay on stderr


def test_ruler_runs_through_the_same_pipeline(tiny_model_dir, tmp_path):
    result = invoke("ruler", "-m", tiny_model_dir, "--tasks", "niah_single,niah_multikey", "--lengths", "600",
                    "--samples", 1, "--methods", "full", "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["suite"] == "ruler" and summary["settings"]["tasks"] == ["niah_single", "niah_multikey"]
    metrics = summary["runs"][0]
    assert set(metrics["by_task"]) == {"niah_single", "niah_multikey"} and metrics["examples"] == 2


def test_longbench_reads_the_users_files_and_shows_scores_by_task(tiny_model_dir, tmp_path):
    data = tmp_path / "longbench"
    data.mkdir()
    records = [{"_id": f"q{i}", "input": "What is the capital of France?", "answers": ["Paris"],
                "context": "The capital of France is Paris. " * (5 + i), "length": 30} for i in range(2)]
    (data / "hotpotqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data / "samsum.jsonl").write_text(json.dumps(records[0] | {"answers": ["A summary."]}) + "\n")
    args = ["longbench", "-m", tiny_model_dir, "--data", data, "--methods", "full", "--out", tmp_path / "o"]
    summary = json.loads(invoke(*args, "--json").stdout)
    run = summary["runs"][0]
    assert summary["suite"] == "longbench" and run["examples"] == 3
    assert run["by_task"]["hotpotqa"]["examples"] == 2 and run["by_task"]["samsum"]["examples"] == 1
    human = invoke(*args, "--tasks", "hotpotqa,samsum")  # the same examples: the finished run is read back
    assert human.exit_code == 0, human.output
    assert "score by task" in human.stdout and "hotpotqa" in human.stdout and "full *" in human.stdout
    assert_one_line_error(invoke("longbench", "--data", tmp_path / "nothing"),
                          f"LongBench folder not found: {tmp_path / 'nothing'}")


@pytest.mark.parametrize("args, message", [
    (["--lengths", "1x"], "--lengths: '1x' is not a length in tokens (write 512, 1k, 4k…)"),
    (["--lengths", "0"], "--lengths: '0' is not a length in tokens (write 512, 1k, 4k…)"),
    (["--lengths", "1.5"], "--lengths: '1.5' is not a length in tokens (write 512, 1k, 4k…)"),
    (["--lengths", " , "], "--lengths is empty"),
    (["--depths", "0,1.5"], "--depths: '1.5' is not a depth between 0 and 1"),
    (["--methods", "full,nosuch"], None),
    (["--budgets", "0%"], None),
    (["--distractors", "10"], "--distractors must be between 0 and 9, got 10"),
    (["--samples", "0"], "--samples must be at least 1, got 0"),
    (["--needle-template", "no number here"], "--needle-template must contain {value}, the number to retrieve"),
    (["--methods", "full,snapkv", "--sinks", "4"], "--sinks applies to streamingllm, not full, snapkv"),
    (["--methods", "full", "--window", "8"], "--window applies to adakv, h2o, pyramidkv, snapkv, uncomp, "
                                             "uncomp-noprune, uncomp-uniform, not full"),
    (["--methods", "snapkv", "--budgets", "16"], "snapkv-16: budget 16 is below the 32-token observation window; "
                                                 "raise the budget or lower the window"),
])
def test_bad_options_fail_in_one_line_before_the_model_loads(haystack_dir, tmp_path, args, message):
    # The model does not exist: had it been loaded first, the error would name it instead.
    result = invoke("needle", "-m", tmp_path / "no-model", "--haystack", haystack_dir, "--out", tmp_path / "o",
                    *args)
    if message is None:
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1 and "no-model" not in result.stderr
    else:
        assert_one_line_error(result, message)
    assert not (tmp_path / "o").exists()


def test_unknown_method_names_the_available_ones(haystack_dir, tmp_path):
    result = invoke("needle", "-m", tmp_path / "no-model", "--haystack", haystack_dir, "--methods", "full,nosuch")
    assert result.stderr.startswith("error: unknown method 'nosuch'; available: ") and "snapkv" in result.stderr


def test_missing_or_empty_haystack_folder(tmp_path):
    assert_one_line_error(invoke("needle", "--haystack", tmp_path / "missing"),
                          f"haystack folder not found: {tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("needle", "--haystack", tmp_path / "empty"),
                          f"haystack folder {tmp_path / 'empty'} has no text files")


def test_lengths_over_the_context_fail_before_any_prompt_is_built(tiny_model_dir, haystack_dir, tmp_path,
                                                                  monkeypatch):
    from uncomp_cli.eval import needle

    monkeypatch.setattr(needle, "make_examples", lambda *a, **k: pytest.fail("prompts were built"))
    result = invoke("needle", "-m", tiny_model_dir, "--haystack", haystack_dir, "--lengths", "1k,2k",
                    "--out", tmp_path / "o")
    assert_one_line_error(result, "--lengths 2048: the prompt and 12 tokens of answer are over "
                          f"{tiny_model_dir.name}'s context of 2048 tokens")
    assert not (tmp_path / "o").exists()


def test_plot_without_matplotlib_is_one_line_before_the_model_loads(haystack_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("needle", "-m", tmp_path / "no-model", "--haystack", haystack_dir, "--plot", tmp_path / "g.png")
    assert_one_line_error(result, "--plot needs matplotlib: pip install 'uncomp[plot]'")


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the plot extra) not installed")
def test_plot_writes_a_png(first_run, tmp_path):
    args, out, result = first_run
    plot = tmp_path / "grid.png"
    again = invoke(*args, "--plot", plot)
    assert again.exit_code == 0, again.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lengths_accept_k_and_sort():
    assert eval_cmd.parse_lengths("4k, 512,1k,1.5k,512") == [512, 1024, 1536, 4096]
    assert eval_cmd.parse_depths("1,0,0.5") == [0.0, 0.5, 1.0]
