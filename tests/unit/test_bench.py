"""uncomp_cli.bench: parsing, statistics, the memory-cap search, and run_bench on a tiny random model.

Nothing here asserts a time or a speed ratio: only structure, exact byte counts and arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from uncomp_cli.bench import measure as bench
from uncomp_cli.bench.measure import summarize
from uncomp_cli.bench.results import BenchSettings
from uncomp_cli.bench.runner import run_bench
from uncomp_cli.bench.search import predict_peak, search_max_batch
from uncomp_cli.errors import UncompError
from uncomp_cli.memory import PeakMemory
from uncomp_cli.models.random_presets import PRESETS, check_fits, load_random_model, preset_config
from uncomp_cli.policies.grid import Cell
from uncomp_cli.profile.reference import reference_profile
from uncomp_cli.units import parse_batch_sizes, parse_length, parse_memory

# -- statistics -----------------------------------------------------------------------------------


def test_summarize_gives_median_and_relative_range():
    s = summarize([3.0, 1.0, 2.0])
    assert (s.median, s.low, s.high, s.count) == (2.0, 1.0, 3.0, 3)
    assert s.spread == pytest.approx((3.0 - 1.0) / 2.0)


def test_summarize_even_count_one_sample_and_zero_median():
    assert summarize([1.0, 2.0, 4.0, 10.0]).median == 3.0
    assert summarize([1.0, 2.0, 4.0, 10.0]).spread == pytest.approx(9.0 / 3.0)
    one = summarize([5.0])
    assert (one.median, one.spread) == (5.0, 0.0)
    assert summarize([0.0, 0.0]).spread == 0.0
    with pytest.raises(ValueError):
        summarize([])


# -- parsing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("8G", 8 * 2**30), ("8g", 8 * 2**30), ("8GB", 8 * 10**9),
    ("1.5GiB", 3 * 2**29), ("100k", 100 * 1024), ("2TiB", 2 * 2**40), ("4096B", 4096), (" 8 GiB ", 8 * 2**30),
])
def test_memory_caps_parse(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["8", "8XB", "-1G", "0G", "GiB", "", "eight GiB", "8 Gibibytes"])
def test_bad_memory_caps_are_user_errors(text):
    with pytest.raises(UncompError):
        parse_memory(text)


@pytest.mark.parametrize("text, expected", [("256", 256), ("1k", 1024), ("4K", 4096), ("1.5k", 1536), ("8000", 8000)])
def test_lengths_parse_with_k_as_1024(text, expected):
    assert parse_length(text) == expected


@pytest.mark.parametrize("text", ["0", "1.1", "k", "-5", "4kk", "4m", "1.0001k"])
def test_bad_lengths_are_user_errors(text):
    with pytest.raises(UncompError):
        parse_length(text)


@pytest.mark.parametrize("text", ["0", "1,0", "a", "", "1,,2", "-3"])
def test_bad_batch_sizes_are_user_errors(text):
    with pytest.raises(UncompError):
        parse_batch_sizes(text)


def test_cases_put_full_first_once_and_honour_own_budgets():
    settings = BenchSettings(methods=["snapkv", "full", "uncomp", "snapkv@100%", "snapkv"], budgets=["5%", "10%"])
    assert settings.cases() == [
        Cell("full"), Cell("snapkv", "5%"), Cell("snapkv", "10%"), Cell("uncomp", "5%"), Cell("uncomp", "10%"),
        Cell("snapkv", "100%"),
    ]
    assert BenchSettings(methods=["snapkv"]).cases()[0] == Cell("full")


@pytest.mark.parametrize("changes, message", [
    ({"methods": ["full", "nope"]}, "unknown method"),
    ({"budgets": ["0%"]}, "budget"),
    ({"budgets": ["16"], "lengths": [256]}, "below the 32-token observation window"),
    ({"new_tokens": 1}, "--new-tokens"),
    ({"repeats": 0}, "--repeats"),
    ({"warmup": -1}, "--warmup"),
    ({"batch_sizes": [0]}, "batch sizes"),
    ({"methods": ["full", "snapkv"], "profile": "x.safetensors"}, "--profile"),
    ({"methods": ["snapkv@"]}, "no budget"),
])
def test_bad_settings_fail_validation(changes, message):
    settings = BenchSettings(**{"lengths": [1024], **changes})
    with pytest.raises(UncompError, match=message):
        settings.validate()


# -- the memory-cap search ------------------------------------------------------------------------


def linear_memory(base: int, per_row: int, calls: list[int] | None = None):
    def measure(batch: int) -> int:
        if calls is not None:
            calls.append(batch)
        return base + per_row * batch
    return measure


@pytest.mark.parametrize("cap, max_batch, expected", [
    (10_000, 1024, 30),  # 1000 + 300 b <= 10000  ->  b = 30
    (1_300, 1024, 1),
    (1_299, 1024, 0),  # not even one row fits
    (1_000 + 300 * 64, 1024, 64),  # exactly on a power of two
    (10**12, 100, 100),  # everything fits: stops at max_batch, even if it is not a power of two
    (10**12, 1, 1),
])
def test_search_finds_the_largest_batch_under_the_cap(cap, max_batch, expected):
    calls: list[int] = []
    best, probes = search_max_batch(linear_memory(1_000, 300, calls), cap, max_batch)
    assert best == expected
    assert [p.batch_size for p in probes] == calls
    assert all(p.fits == (p.peak_memory_bytes <= cap) for p in probes)
    assert max(calls) <= max_batch
    if 0 < best < max_batch:
        assert best + 1 in calls and best in calls  # the boundary was measured on both sides
    assert len(calls) == len(set(calls))  # nothing measured twice


def test_search_doubles_then_bisects():
    calls: list[int] = []
    search_max_batch(linear_memory(1_000, 300, calls), 10_000)
    assert calls[:6] == [1, 2, 4, 8, 16, 32]
    assert all(16 < b < 32 for b in calls[6:])


def test_search_treats_a_run_that_cannot_happen_as_not_fitting():
    best, probes = search_max_batch(lambda b: None if b > 5 else 10 * b, cap=10**9, max_batch=64)
    assert best == 5
    assert any(p.peak_memory_bytes is None and not p.fits for p in probes)


def test_peak_prediction_extrapolates_from_the_largest_measured_batches():
    assert predict_peak([], 4) is None
    assert predict_peak([(2, 1000)], 4) == 2000
    assert predict_peak([(1, 1300), (2, 1600), (4, 2200)], 8) == 2200 + 300 * 4


# -- prompts and memory ---------------------------------------------------------------------------


def test_random_prompts_have_exact_lengths_and_stable_rows():
    one = bench.random_prompt_ids(1, 100, 50, seed=3)
    three = bench.random_prompt_ids(3, 100, 50, seed=3)
    assert three.shape == (3, 100) and int(three.max()) < 50
    assert torch.equal(one[0], three[0])
    assert not torch.equal(three[0], bench.random_prompt_ids(1, 100, 50, seed=4)[0])


def test_haystack_prompts_wrap_to_any_length():
    ids = bench.haystack_prompt_ids(list(range(10)), batch=2, length=25, seed=0)
    assert ids.shape == (2, 25)
    for row in ids.tolist():
        assert all((b - a) % 10 == 1 for a, b in zip(row, row[1:]))  # consecutive tokens of the text


def test_cpu_peak_memory_is_per_run_not_process_lifetime():
    meter = PeakMemory(torch.device("cpu"))
    if not meter.available:
        pytest.skip("per-run peak RSS needs Linux /proc/self/clear_refs")
    meter.start()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = meter.peak()
    del big
    start = meter.start()
    assert meter.peak() < high - 32 * 2**20
    assert meter.peak() >= start


# -- random models --------------------------------------------------------------------------------


def test_presets_have_real_shapes_and_known_sizes():
    from uncomp_cli.models.random_presets import parameter_count

    config = preset_config("qwen2-0.5b")
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (24, 14, 2)
    assert parameter_count(preset_config("llama3.2-1b")) == 1_235_814_400
    assert preset_config("llama3-8b", layers=2).num_hidden_layers == 2
    assert set(PRESETS) >= {"llama3-8b", "llama3.2-1b", "mistral-7b", "qwen2-0.5b", "qwen2-7b", "tiny"}
    with pytest.raises(UncompError, match="unknown model config"):
        preset_config("llama9")
    with pytest.raises(UncompError, match="--layers"):
        preset_config("tiny", layers=0)


def test_weights_that_do_not_fit_are_refused_before_allocating(monkeypatch):
    from uncomp_cli.models import random_presets as model_configs

    monkeypatch.setattr(model_configs, "available_memory_bytes", lambda device: 24 * 2**30)
    with pytest.raises(UncompError, match=r"needs 29\.\d GiB .* 24\.0 GiB available"):
        check_fits("llama3-8b", preset_config("llama3-8b"), torch.device("cpu"), torch.float32)
    assert check_fits("llama3-8b", preset_config("llama3-8b", layers=2), torch.device("cpu"), torch.float32) > 0


@pytest.mark.parametrize("preset", ["llama3-8b", "mistral-7b", "qwen2-7b", "tiny"])
def test_reference_profile_is_valid_for_the_preset(preset):
    config = preset_config(preset)
    profile = reference_profile(config)
    profile.check_model(config)
    assert profile.num_stages == min(5, config.num_hidden_layers)
    assert profile.layer_stage[0] == 0 and bool((profile.layer_stage.diff() >= 0).all())
    assert float(profile.kv_head_share().mean()) == pytest.approx(1.0)


# -- run_bench ------------------------------------------------------------------------------------

NEW = 4


@pytest.fixture(scope="module")
def tiny():
    return load_random_model("tiny", layers=2, device="cpu")


def kv_bytes(config, batch: int, tokens_per_head) -> int:
    """Bytes of keys + values in float32 for ``tokens_per_head`` [L][H_kv] stored tokens per row."""
    return sum(sum(row) for row in tokens_per_head) * batch * config.head_dim * 2 * 4


@pytest.fixture(scope="module")
def grid(tiny):
    settings = BenchSettings(methods=["full", "snapkv", "uncomp"], lengths=[64, 96], budgets=["40"],
                             new_tokens=NEW, warmup=0, repeats=2)
    return run_bench(tiny, settings)


@pytest.fixture(scope="module")
def batched(tiny):
    settings = BenchSettings(methods=["full", "snapkv"], lengths=[64], budgets=["40"], batch_sizes=[2],
                             new_tokens=NEW, warmup=0, repeats=1)
    return run_bench(tiny, settings)


def test_every_method_length_and_batch_has_a_row_with_every_field(grid, batched):
    keys = {(r.method, r.length, r.batch_size) for r in grid.rows}
    assert keys == {(m, n, 1) for m in ("full", "snapkv", "uncomp") for n in (64, 96)}
    assert [(r.method, r.batch_size) for r in batched.rows] == [("full", 2), ("snapkv", 2)]
    data = grid.to_dict()
    assert data["model"] == "random tiny, 2 of 4 layers (not trained weights; speed only)"
    assert data["random_weights"] is True
    for row in data["rows"]:
        for key in ("ttft_seconds", "prefill_seconds", "decode_tokens_per_second", "kv_cache_bytes",
                    "peak_memory_bytes", "ttft_spread", "prefill_spread", "decode_spread", "prefill_vs_full",
                    "decode_vs_full", "kv_cache_vs_full", "peak_memory_vs_full", "ttft_vs_full"):
            assert key in row
        assert row["repeats"] == 2 and row["new_tokens"] == NEW
        assert row["ttft_seconds"] >= row["prefill_seconds"] > 0
        assert row["decode_tokens_per_second"] > 0


def test_full_against_itself_is_exactly_one(grid, batched):
    for row in grid.rows + batched.rows:
        if row.method == "full":
            assert row.budget is None
            for name in ("ttft_vs_full", "prefill_vs_full", "decode_vs_full", "kv_cache_vs_full"):
                assert getattr(row, name) == 1.0
            if row.peak_memory_bytes is not None:
                assert row.peak_memory_vs_full == 1.0


def test_kv_bytes_and_their_ratio_follow_the_formula(grid, batched, tiny):
    config = tiny.model.config
    L, H = config.num_hidden_layers, config.num_key_value_heads
    rows = grid.rows + batched.rows
    full = {(r.length, r.batch_size): r for r in rows if r.method == "full"}
    for row in rows:
        reference = full[(row.length, row.batch_size)]
        seen = row.length + NEW - 1  # the last new token is never fed back
        assert reference.kv_cache_bytes == kv_bytes(config, row.batch_size, [[seen] * H] * L)
        assert row.full_kv_cache_bytes == reference.kv_cache_bytes
        assert row.kv_cache_vs_full == pytest.approx(row.kv_cache_bytes / reference.kv_cache_bytes)
        if row.method == "snapkv":  # 40 kept per KV head, then the appended new tokens
            assert row.kv_cache_bytes == kv_bytes(config, row.batch_size, [[40 + NEW - 1] * H] * L)
            assert row.kv_cache_vs_full == pytest.approx((40 + NEW - 1) / seen)
        if row.method == "uncomp":
            assert row.kv_cache_bytes < reference.kv_cache_bytes


def test_uncomp_budgets_on_a_random_model_come_from_the_reference_profile(grid, tiny):
    from uncomp_cli.policies.registry import make_policy

    assert "reference structure" in grid.meta["profile"]
    policy = make_policy("uncomp", profile=reference_profile(tiny.model.config), budget="40")
    budgets, _ = policy.resolve(tiny.model, torch.ones(1, 96, dtype=torch.long))
    row = next(r for r in grid.rows if r.method == "uncomp" and r.length == 96 and r.batch_size == 1)
    assert row.kv_cache_bytes == kv_bytes(tiny.model.config, 1, (budgets + NEW - 1).tolist())


def test_lengths_over_the_context_are_refused(tiny):
    with pytest.raises(UncompError, match="context"):
        run_bench(tiny, BenchSettings(methods=["full"], lengths=[16384], warmup=0, repeats=1))


def test_throughput_mode_finds_a_batch_per_method(tiny):
    settings = BenchSettings(methods=["full", "snapkv"], lengths=[64], budgets=["40"], new_tokens=NEW, warmup=0,
                             repeats=1, memory_cap=parse_memory("4GiB"), max_batch=2)
    report = run_bench(tiny, settings)
    assert [r.method for r in report.throughput] == ["full", "snapkv"]
    for row in report.throughput:
        assert row.max_batch_size == 2  # a tiny model fits 2 rows in 4 GiB: probes 1, 2, then the limit
        assert [p.batch_size for p in row.probes] == [1, 2]
        assert row.measured is not None and row.measured.batch_size == 2
    assert report.throughput[0].throughput_vs_full == 1.0 and report.throughput[0].max_batch_vs_full == 1.0
    data = report.to_dict()
    assert data["memory_cap_bytes"] == 4 * 2**30 and "rows" not in data
    assert data["throughput"][1]["decode_tokens_per_second"] > 0


def test_throughput_mode_reports_a_cap_nothing_fits_under(tiny):
    settings = BenchSettings(methods=["full"], lengths=[64], new_tokens=NEW, warmup=0, repeats=1,
                             memory_cap=parse_memory("1MiB"), max_batch=4)
    row = run_bench(tiny, settings).throughput[0]
    assert row.max_batch_size == 0 and row.measured is None and row.decode_tokens_per_second is None


def test_method_options_reach_the_methods_that_take_them_and_no_others():
    settings = BenchSettings(methods=["snapkv", "uncomp", "uncomp-noprune"], budgets=["50%"], lengths=[1024],
                             method_options={"prefill_keep": "0.5", "window": 16})
    full, snapkv, uncomp, noprune = settings.policies()
    assert uncomp.prefill_keep == [0.5] and noprune.prefill_keep is None  # noprune never prunes
    assert not hasattr(snapkv, "prefill_keep") and snapkv.window == uncomp.window == 16
    with pytest.raises(UncompError, match="must not rise"):
        BenchSettings(methods=["uncomp"], lengths=[1024], method_options={"prefill_keep": "0.5,0.9"}).validate()
    with pytest.raises(UncompError, match="^--sinks applies to streamingllm, not full, snapkv$"):
        BenchSettings(methods=["snapkv"], lengths=[1024], method_options={"sinks": 8}).validate()


@pytest.mark.parametrize("scorer", [None, "window"])
def test_reuse_mode_scores_contexts_with_the_scorer_asked_for(tiny, scorer):
    settings = BenchSettings(methods=["snapkv"], lengths=[64], budgets=["40"], warmup=0, repeats=1, reuse=True,
                             context_scorer=scorer)
    rows = run_bench(tiny, settings).to_dict()["reuse"]
    assert [row["context_scorer"] for row in rows] == [None, scorer or "reconstruct"]  # full scores nothing


def test_reuse_mode_holds_8_bit_contexts_in_fewer_bytes_and_the_full_cache_as_it_is(tiny):
    settings = BenchSettings(methods=["snapkv"], lengths=[64], budgets=["40"], warmup=0, repeats=1, reuse=True)
    plain = run_bench(tiny, settings).to_dict()["reuse"]
    settings.kv_bits = 8
    report = run_bench(tiny, settings)
    rounded = report.to_dict()["reuse"]
    assert [row["kv_bits"] for row in rounded] == [None, 8] and [row["kv_bits"] for row in plain] == [None, None]
    assert rounded[0]["kv_cache_bytes"] == plain[0]["kv_cache_bytes"]
    assert rounded[1]["kv_cache_bytes"] < 0.5 * plain[1]["kv_cache_bytes"]
    assert rounded[1]["file_bytes"] < plain[1]["file_bytes"]
    from io import StringIO

    from rich.console import Console

    from uncomp_cli.bench.render import render_report

    out = StringIO()
    render_report(report, Console(file=out, width=220))
    assert "8-bit contexts" in out.getvalue() and "KV MiB" in out.getvalue()
    with pytest.raises(UncompError, match="^--kv-bits is for --context-reuse"):
        BenchSettings(methods=["snapkv"], lengths=[64], kv_bits=8).validate()
    with pytest.raises(UncompError, match="--kv-bits must be 8"):
        BenchSettings(methods=["snapkv"], lengths=[64], reuse=True, kv_bits=2).validate()


def test_a_context_scorer_needs_reuse_mode_and_a_known_name():
    with pytest.raises(UncompError, match="^--context-scorer is for --context-reuse"):
        BenchSettings(methods=["snapkv"], lengths=[64], context_scorer="gate").validate()
    with pytest.raises(UncompError, match="window, reconstruct, gate"):
        BenchSettings(methods=["snapkv"], lengths=[64], reuse=True, context_scorer="oracle").validate()


def test_reuse_mode_reports_what_making_a_context_costs_against_a_full_prefill(tiny):
    settings = BenchSettings(methods=["snapkv"], lengths=[64], budgets=["40"], warmup=0, repeats=1, reuse=True)
    report = run_bench(tiny, settings)
    assert [row["method"] for row in report.to_dict()["reuse"]] == ["full", "snapkv"]
    for row in report.to_dict()["reuse"]:
        assert row["prefill_full_seconds"] > 0 and row["compress_seconds"] > 0
        assert row["make_context_over_prefill"] == pytest.approx(row["compress_seconds"] / row["prefill_full_seconds"])
        assert row["make_context_over_prefill"] > 0
    from io import StringIO

    from rich.console import Console

    from uncomp_cli.bench.render import render_report

    out = StringIO()
    render_report(report, Console(file=out, width=200))
    assert "make ×" in out.getvalue()
