"""``uncomp generate --method`` for the baselines and the UNComp ablations, end to end."""

from __future__ import annotations

import pytest
from generate_cli import PROMPT, as_json, run


@pytest.mark.parametrize("method", ["streamingllm", "pyramidkv", "h2o"])
def test_a_budget_that_holds_the_prompt_gives_the_full_cache_output(tiny_model_dir, method):
    common = ["-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 5, "--json"]
    full = as_json(run(*common))
    same = as_json(run(*common, "--method", method, "--budget", "100%"))
    assert same["text"] == full["text"]
    assert same["kv_cache_bytes"] == full["kv_cache_bytes"]
    assert same["method"] == method


def test_small_budgets_hold_fewer_bytes_and_report_their_settings(tiny_model_dir):
    common = ["-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 3, "--json"]
    # 20 tokens is below the 32-token window: fine for streamingllm, whose rule is room after the sinks
    streaming = as_json(run(*common, "--method", "streamingllm", "--budget", 20, "--sinks", 2, "--decode-evict"))
    assert streaming["sinks"] == 2 and streaming["kv_budget_tokens"] == 20
    assert streaming["kv_cache_bytes"] < 0.5 * streaming["full_kv_cache_bytes"]
    pyramid = as_json(run(*common, "--method", "pyramidkv", "--budget", 40, "--window", 8, "--kernel", 3,
                          "--beta", 10))
    per_layer = pyramid["kv_budget_tokens_per_layer"]
    assert pyramid["beta"] == 10 and sum(per_layer) == 40 * len(per_layer) and per_layer == sorted(per_layer)[::-1]
    h2o = as_json(run(*common, "--method", "h2o", "--budget", 40, "--window", 8, "--aggregate", "max"))
    assert h2o["aggregate"] == "max" and h2o["kv_cache_bytes"] < 0.5 * h2o["full_kv_cache_bytes"]


def test_the_ablations_take_the_profile_and_report_their_names(tiny_model_dir, tiny_profile):
    common = ["-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 2, "--json", "--profile", tiny_profile,
              "--budget", 40, "--window", 8]
    noprune = as_json(run(*common, "--method", "uncomp-noprune"))  # --prefill-compression is on by default
    assert noprune["method"] == "uncomp-noprune" and noprune["prefill_compression"] is False
    assert set(noprune["prefill_tokens_per_layer"]) == {noprune["prompt_tokens"]}
    uniform = as_json(run(*common, "--method", "uncomp-uniform"))
    assert uniform["method"] == "uncomp-uniform" and uniform["uniform_heads"] is True


@pytest.mark.parametrize("args, message", [
    (["--method", "streamingllm", "--budget", "4"], "no room for recent tokens after the 4 attention sinks"),
    (["--method", "pyramidkv", "--beta", "0.5"], "--beta must be at least 1"),
    (["--method", "h2o", "--budget", "16"], "below the 32-token observation window"),
    (["--method", "streamingllm", "--profile", "x.safetensors"], "--profile is for"),
])
def test_bad_baseline_settings_exit_2_with_one_line(tiny_model_dir, args, message):
    result = run("-m", tiny_model_dir, "hello", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""
