"""Calibration on tiny random models: exact capture of post-RoPE states, aggregation, stages, groups, data."""

from __future__ import annotations

import io
import itertools
import json
import weakref

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from uncomp_cli.errors import UncompError
from uncomp_cli.profile.calibrate import (
    ATTENTION_NAME,
    EntropyRecorder,
    aggregate_kv_heads,
    calibrate,
    group_budget_shares,
    group_sizes,
    kv_head_groups,
    layer_stages,
    rank_labels,
    stage_keep_fractions,
)
from uncomp_cli.profile.calibration_text import (
    CalibrationText,
    builtin_texts,
    iter_builtin_documents,
    read_texts,
    token_windows,
)
from uncomp_cli.profile.entropy import normalized_truncated_entropy
from uncomp_cli.profile.file import ModelShape

SEQ = 48


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def windows(tokenizer):
    text = CalibrationText(
        tuple(f"document {i}: the quick brown fox jumps over the lazy dog " * 6 for i in range(6)), "t"
    )
    return token_windows(text, tokenizer, samples=3, seq_len=SEQ)


def reference_states(model, input_ids: torch.Tensor, source: str) -> list[torch.Tensor]:
    """Post-RoPE query (or key) states of every layer, rebuilt by hand from the projections."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        projection = layer.self_attn.q_proj if source == "query" else layer.self_attn.k_proj
        hooks.append(projection.register_forward_hook(lambda m, a, out, i=index: captured.__setitem__(i, out)))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
            positions = torch.arange(input_ids.shape[1])[None]
            cos, sin = model.model.rotary_emb(captured[0], positions)
    finally:
        for hook in hooks:
            hook.remove()
    head_dim = model.config.head_dim
    states = []
    for index in range(len(model.model.layers)):
        x = captured[index].view(1, input_ids.shape[1], -1, head_dim).transpose(1, 2)
        rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
        states.append(rotated)
    return states


# --------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "mistral-gqa", "qwen2-gqa"])
def test_head_entropies_are_those_of_the_post_rope_queries(name, tokenizer, windows):
    model = tiny_model(name, vocab_size=len(tokenizer))
    profile = calibrate(model, windows, model_name=name, rank_k=4)
    shape = ModelShape.from_config(model.config)
    expected = torch.stack(
        [
            torch.stack([normalized_truncated_entropy(q, 4)[0] for q in reference_states(model, w[None], "query")])
            for w in windows.input_ids
        ]
    )  # [S, L, H]
    assert profile.sample_head_entropy.shape == (3, shape.num_layers, shape.num_heads)
    torch.testing.assert_close(profile.sample_head_entropy, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(profile.head_entropy, expected.mean(0).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(profile.head_entropy_std, expected.std(0, correction=0).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(profile.layer_entropy, expected.mean((0, 2)).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen3-gqa", "gemma2-gqa", "gemma3-gqa", "phi3-gqa"])
def test_calibration_runs_the_model_as_its_own_eager_attention_does(name, tokenizer, windows):
    """q/k norms, fused projections, sliding windows, soft-capping and per-layer RoPE: the queries
    calibration measures are those the model's own (eager) attention receives."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = tiny_model(name, vocab_size=len(tokenizer))
    profile = calibrate(model, windows, model_name=name, rank_k=4)
    eager = sys.modules[type(model.model.layers[0].self_attn).__module__].eager_attention_forward
    seen: dict[int, torch.Tensor] = {}

    def spy(module, query, *args, **kwargs):
        seen[module.layer_idx] = normalized_truncated_entropy(query, 4)[0]
        return eager(module, query, *args, **kwargs)

    AttentionInterface.register("test-spy", spy)
    AttentionMaskInterface.register("test-spy", eager_mask)
    model.set_attn_implementation("test-spy")
    expected = []
    with torch.no_grad():
        for window in windows.input_ids:
            model(input_ids=window[None], use_cache=False)
            expected.append(torch.stack([seen[i] for i in range(len(model.model.layers))]))
    torch.testing.assert_close(profile.sample_head_entropy, torch.stack(expected).float(), rtol=1e-4, atol=1e-5)


def test_gqa_kv_head_entropy_aggregates_the_query_heads_sharing_it(tokenizer, windows):
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))  # 4 query heads, 2 KV heads
    mean = calibrate(model, windows, model_name="t")
    top = calibrate(model, windows, model_name="t", kv_aggregation="max")
    per_sample = mean.sample_head_entropy.double()
    torch.testing.assert_close(
        mean.kv_head_entropy.double(), per_sample.reshape(3, 4, 2, 2).mean(-1).mean(0), rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(
        top.kv_head_entropy.double(), per_sample.reshape(3, 4, 2, 2).amax(-1).mean(0), rtol=1e-6, atol=1e-7
    )
    assert mean.kv_head_group.shape == (4, 2) and mean.kv_head_votes.shape == (4, 2, 2)
    assert torch.all(mean.kv_head_votes.sum(-1) == 3)


def test_key_source_measures_kv_heads(tokenizer, windows):
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    profile = calibrate(model, windows, model_name="t", source="key", rank_k=4)
    expected = torch.stack(
        [
            torch.stack([normalized_truncated_entropy(k, 4)[0] for k in reference_states(model, w[None], "key")])
            for w in windows.input_ids
        ]
    ).mean(0)  # [L, H_kv]
    torch.testing.assert_close(profile.kv_head_entropy, expected.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        profile.head_entropy, expected.repeat_interleave(2, dim=-1).float(), rtol=1e-5, atol=1e-6
    )
    assert profile.entropy_source == "key"


def test_attention_is_restored_and_outputs_unchanged_even_after_a_failure(tokenizer, windows):
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    ids = windows.input_ids[:1]
    with torch.no_grad():
        before = model(input_ids=ids).logits

    def interrupt(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(model, windows, model_name="t", progress=interrupt)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    from transformers import AttentionInterface

    assert not isinstance(AttentionInterface._global_mapping[ATTENTION_NAME], EntropyRecorder)


def test_progress_counts_every_layer_pass(tokenizer, windows):
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    calls = []
    calibrate(model, windows, model_name="t", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 12) for i in range(1, 13)]


def test_recorder_keeps_no_reference_to_the_states():
    shape = ModelShape(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    recorder = EntropyRecorder(shape, "query", rank_k=2)
    module = torch.nn.Module()
    module.layer_idx = 1
    module.num_key_value_groups = 2
    module.is_causal = True
    query = torch.randn(1, 2, 10, 8)
    key = value = torch.randn(1, 1, 10, 8)
    alive = weakref.ref(query)
    out, _ = recorder(module, query, key, value, None, scaling=8**-0.5, dropout=0.0)
    assert out.shape == (1, 10, 2, 8)
    torch.testing.assert_close(recorder.values[1], normalized_truncated_entropy(query, 2)[0])
    del query
    assert alive() is None
    assert torch.isnan(recorder.values[0]).all()


def test_invalid_settings_are_refused_before_running(tokenizer, windows):
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    with pytest.raises(UncompError, match="--rank-k 17 is larger than the head size 16"):
        calibrate(model, windows, model_name="t", rank_k=17)
    with pytest.raises(UncompError, match="--groups 3 is not possible with 2 KV heads per layer; use 1 to 2"):
        calibrate(model, windows, model_name="t", groups=3)
    with pytest.raises(UncompError, match="--source must be one of query, key \\(got 'value'\\)"):
        calibrate(model, windows, model_name="t", source="value")


# --------------------------------------------------------------------------------- rules
def test_stages_start_where_entropy_drops_by_more_than_the_threshold():
    entropy = torch.tensor([1.0, 0.9, 0.95, 0.7, 0.72, 0.71])
    stages, keep = layer_stages(entropy, 0.05)
    assert stages.tolist() == [0, 1, 1, 2, 2, 2]
    assert keep.tolist() == pytest.approx([1.0, 1 - 640 / 4096, 1 - 1280 / 4096])
    assert layer_stages(entropy, 0.5)[0].tolist() == [0] * 6
    assert layer_stages(entropy, 0.0)[0].tolist() == [0, 1, 1, 2, 2, 3]
    with pytest.raises(UncompError, match="zero or positive"):
        layer_stages(entropy, -0.1)


def test_keep_fractions_follow_the_official_schedule():
    assert (stage_keep_fractions(5) * 4096).tolist() == pytest.approx([4096, 3456, 2816, 2176, 1536])
    assert stage_keep_fractions(1).tolist() == [1.0]
    many = stage_keep_fractions(9)
    assert many[0] == 1.0 and many[-1].item() == pytest.approx(0.375)
    assert torch.all(many.diff() < 0)


def test_group_sizes_and_budget_shares():
    assert group_sizes(3, 2) == [2, 1]
    assert group_sizes(32, 3) == [11, 11, 10]
    assert group_budget_shares(2).tolist() == pytest.approx([2 / 3, 4 / 3])
    shares = group_budget_shares(2, [2, 1])
    assert float((shares * torch.tensor([2.0, 1.0])).sum() / 3) == pytest.approx(1.0)
    eight = group_budget_shares(8)
    assert torch.all(eight.diff() > 0) and float(eight.mean()) == pytest.approx(1.0)
    assert group_budget_shares(1).tolist() == [1.0]


def test_aggregate_kv_heads_follows_the_repeat_kv_layout():
    heads = torch.tensor([[1.0, 3.0, 10.0, 20.0]])
    assert aggregate_kv_heads(heads, 2).tolist() == [[2.0, 15.0]]
    assert aggregate_kv_heads(heads, 2, "max").tolist() == [[3.0, 20.0]]
    assert aggregate_kv_heads(heads, 4).tolist() == heads.tolist()
    with pytest.raises(UncompError):
        aggregate_kv_heads(heads, 3)


def test_rank_labels_split_by_rank():
    assert rank_labels(torch.tensor([0.5, 0.1, 0.9]), 2).tolist() == [0, 0, 1]
    assert rank_labels(torch.tensor([0.5, 0.1, 0.9, 0.3]), 4).tolist() == [2, 0, 3, 1]


def test_groups_follow_the_majority_vote_not_the_mean():
    # one layer, three KV heads; head 2 is lowest in 4 of 5 samples but has one huge outlier
    samples = torch.tensor([[[0.5, 0.6, 0.1]]] * 4 + [[[0.5, 0.6, 9.0]]])
    groups, votes = kv_head_groups(samples, 3)
    assert votes[0].tolist() == [[1, 4, 0], [0, 1, 4], [4, 0, 1]]
    assert groups[0].tolist() == [1, 2, 0]  # by mean entropy head 2 would rank highest
    with pytest.raises(UncompError):
        kv_head_groups(samples, 4)


def test_vote_ties_are_broken_by_mean_entropy():
    samples = torch.tensor([[[0.1, 0.9]], [[0.9, 0.1]], [[0.2, 0.3]], [[0.45, 0.3]]])  # 2 votes each way
    groups, _ = kv_head_groups(samples, 2)
    assert groups[0].tolist() == [1, 0]  # mean entropy 0.4125 vs 0.4


# --------------------------------------------------------------------------------- data
def test_read_texts_from_files_folders_globs_jsonl_and_stdin(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta text")
    (tmp_path / ".hidden").write_text("never read")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "delta"}) + "\n")
    assert read_texts([str(tmp_path / "a.txt")]).documents == ("alpha text",)
    assert read_texts([str(tmp_path)]).documents == ("alpha text", "gamma", "delta", "beta text")
    assert read_texts([str(tmp_path / "*.txt")]).documents == ("alpha text",)
    assert read_texts([str(tmp_path / "**" / "*.md")]).documents == ("beta text",)
    both = read_texts(["-", str(tmp_path / "c.jsonl")], stdin=io.BytesIO("from stdin ✓".encode()))
    assert both.documents == ("from stdin ✓", "gamma", "delta")
    assert "stdin" in both.description


def test_bad_data_is_refused_naming_the_file(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    cases = {
        str(binary): f"{binary} is not text (binary data); calibration needs UTF-8 text",
        str(latin): f"{latin} is not UTF-8 text (invalid byte at offset 3)",
        str(jsonl): f"{jsonl} line 2: no string field 'text'",
        str(tmp_path / "absent.txt"): f"calibration data not found: {tmp_path / 'absent.txt'}",
        str(tmp_path / "*.nothing"): f"no files match '{tmp_path / '*.nothing'}'",
    }
    for source, message in cases.items():
        with pytest.raises(UncompError) as excinfo:
            read_texts([source])
        assert str(excinfo.value) == message


def test_windows_are_evenly_spaced_slices_of_the_token_stream(tokenizer):
    text = CalibrationText(("one two three four five six seven eight nine ten " * 20,), "t")
    stream = tokenizer(text.documents[0], add_special_tokens=False)["input_ids"]
    windows = token_windows(text, tokenizer, samples=3, seq_len=16)
    assert windows.input_ids.shape == (3, 16) and windows.input_ids.dtype == torch.int64
    available = len(stream) // 16
    for row, start in zip(windows.input_ids.tolist(), [0, (available - 1) // 2, available - 1], strict=True):
        assert row == stream[start * 16 : start * 16 + 16]
    assert windows.sha256 == text.sha256


def test_too_little_text_says_how_much_is_needed(tokenizer):
    text = CalibrationText(("short text",), "t")
    found = len(tokenizer("short text", add_special_tokens=False)["input_ids"])
    with pytest.raises(UncompError) as excinfo:
        token_windows(text, tokenizer, samples=2, seq_len=64)
    assert str(excinfo.value) == (
        "not enough calibration text: 2 samples × 64 tokens need 128 tokens of text, "
        f"found {found} (0 windows); add text or lower --samples/--seq-len"
    )
    with pytest.raises(UncompError, match="--samples must be at least 1 \\(got 0\\)"):
        token_windows(text, tokenizer, samples=0, seq_len=64)


def test_builtin_source_is_deterministic_and_sufficient(tokenizer):
    first = builtin_texts(2000, tokenizer)
    second = builtin_texts(2000, tokenizer)
    assert first == second and first.sha256 == second.sha256
    assert "standard library docstrings" in first.description
    windows = token_windows(first, tokenizer, samples=4, seq_len=500)
    assert windows.input_ids.shape == (4, 500)
    docs = list(itertools.islice(iter_builtin_documents(), 300))
    assert len(docs) == 300 and sum(map(len, docs)) > 100_000
    assert all("\x00" not in doc for doc in docs)
