"""``uncomp generate --method``: compressed caches through the CLI, profiles found or refused."""

from __future__ import annotations

import pytest
from generate_cli import PROMPT, as_json, run
from tiny import tiny_model, tiny_tokenizer

from uncomp_cli.policies import available_methods


@pytest.mark.parametrize("method", ["snapkv", "uncomp"])
def test_a_budget_that_holds_the_prompt_gives_the_full_cache_output(tiny_model_dir, tiny_profile, method):
    full = as_json(run("-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 6, "--json"))
    # uncomp spreads the average over heads (x0.75 / x1.5 here): an average of twice the prompt
    # still clips every head to the whole prompt.
    extra = ["--profile", tiny_profile, "--no-prefill-compression", "--budget", "4096"] if method == "uncomp" \
        else ["--budget", "100%"]
    same = as_json(run("-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 6, "--json", "--method", method,
                       *extra))
    assert same["text"] == full["text"]
    assert same["kv_cache_bytes"] == full["kv_cache_bytes"]


def test_uncomp_at_a_small_budget_holds_fewer_bytes_and_reports_its_settings(tiny_model_dir, tiny_profile):
    data = as_json(run("-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 4, "--json", "--method", "uncomp",
                       "--profile", tiny_profile, "--budget", "40", "--window", "8", "--kernel", "3"))
    assert data["method"] == "uncomp" and data["budget"] == "40" and data["window"] == 8
    assert data["kv_cache_bytes"] < 0.5 * data["full_kv_cache_bytes"]
    assert len(data["prefill_tokens_per_layer"]) == len(data["layer_stage"]) == 4
    assert data["prefill_tokens_per_layer"][0] == data["prompt_tokens"]


def test_uncomp_without_a_profile_calibrates_once_and_caches_it(tiny_model_dir, monkeypatch):
    from uncomp_cli.profile import store as profile_store

    monkeypatch.setattr(profile_store, "AUTO_SAMPLES", 2)
    monkeypatch.setattr(profile_store, "AUTO_SEQ_LEN", 64)
    calls = []
    original = profile_store.profile_for

    def counting(loaded, path=None, samples=2, seq_len=64):
        calls.append(profile_store.cached_profile_path(loaded.model.config).is_file())
        return original(loaded, path, samples, seq_len)

    monkeypatch.setattr(profile_store, "profile_for", counting)
    first = run("-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 2, "--method", "uncomp", "--budget", "50%")
    assert first.exit_code == 0, first.stderr
    assert "calibrating once" in first.stderr
    second = run("-m", tiny_model_dir, PROMPT, "--raw", "--max-new-tokens", 2, "--method", "uncomp", "--budget", "50%")
    assert second.exit_code == 0 and "calibrating" not in second.stderr
    assert calls == [False, True]


@pytest.mark.parametrize("args, message", [
    (["--method", "snapkv", "--budget", "0"], "budget 0 must be at least 1 token"),
    (["--method", "snapkv", "--budget", "-5"], "budget -5 must be at least 1 token"),
    (["--method", "snapkv", "--budget", "150%"], "budget 150% must be more than 0% and at most 100%"),
    (["--method", "snapkv", "--budget", "16"], "below the 32-token observation window"),
    (["--method", "snapkv", "--budget", "lots"], "is not a token count (128) or a percentage (5%)"),
    (["--method", "magic"], f"unknown method 'magic'; available: {', '.join(available_methods())}"),
    (["--method", "snapkv", "--pooling", "median"], "pooling"),
    (["--method", "uncomp", "--prefill-keep", "0.5,0.9"], "--prefill-keep fractions must not rise"),
    (["--method", "snapkv", "--profile", "x.safetensors"], "--profile is for the methods uncomp, uncomp-noprune, "
                                                         "uncomp-uniform, not snapkv"),
])
def test_bad_method_settings_exit_2_with_one_line(tiny_model_dir, args, message):
    result = run("-m", tiny_model_dir, "hello", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_a_profile_for_another_model_is_refused(tiny_profile, tmp_path):
    other = tmp_path / "other"
    tok = tiny_tokenizer()
    tiny_model("llama-mha", vocab_size=len(tok), layers=3).save_pretrained(other)
    tok.save_pretrained(other)
    result = run("-m", other, "hello", "--method", "uncomp", "--profile", tiny_profile)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: profile is for 4 layers")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--method", "snapkv", "--sinks", "4"], "error: --sinks applies to streamingllm, not snapkv"),
    (["--method", "full", "--budget", "5%"], "error: --budget applies to adakv, h2o, pyramidkv, snapkv, "
                                             "streamingllm, uncomp, uncomp-noprune, uncomp-uniform, not full"),
    (["--method", "streamingllm", "--window", "8"], "error: --window applies to adakv, h2o, pyramidkv, snapkv, "
                                                     "uncomp, uncomp-noprune, uncomp-uniform, not streamingllm"),
    (["--method", "uncomp-noprune", "--prefill-keep", "0.5"], "error: --prefill-keep applies to uncomp, "
                                                               "uncomp-uniform, not uncomp-noprune"),
    (["--method", "h2o", "--no-decode-evict", "--floor", "0.5"], "error: --floor applies to adakv, not h2o"),
])
def test_an_option_the_method_does_not_take_is_one_error_line_before_the_model_loads(tmp_path, args, message):
    result = run("-m", tmp_path / "no-model", "hello", *args)  # the model would fail to load: it is never tried
    assert result.exit_code == 2
    assert result.stderr.strip() == message and result.stdout == ""


def test_a_share_too_small_for_a_short_prompt_keeps_it_whole_and_notes_it_once(tiny_model_dir, tiny_profile):
    common = ["-m", tiny_model_dir, "hello there", "--raw", "--max-new-tokens", 3, "--json"]
    full = as_json(run(*common))
    for method in ("snapkv", "uncomp"):
        profile = ["--profile", tiny_profile] if method == "uncomp" else []
        result = run(*common, "--method", method, "--budget", "10%", *profile)
        data = as_json(result)
        assert data["text"] == full["text"] and data["kv_cache_bytes"] == full["kv_cache_bytes"]
        assert data["kv_budget_tokens"] == data["prompt_tokens"] and "too short to compress" in data["budget_note"]
        assert result.stderr.count("note: budget 10% of this") == 1
