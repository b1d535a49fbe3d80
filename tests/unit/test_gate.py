"""The score gate: re-reading scores predicted during the prefill (uncomp_cli.contexts.gate).

On the tiny random model: a gate trained on a little built-in text, its file, and compressed
contexts scored by it, compared with the full cache and with the budget, never with expected text.
"""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import tiny_config, tiny_model

from uncomp_cli.contexts import gate as gate_module
from uncomp_cli.contexts.compress import ask, compress_context
from uncomp_cli.contexts.gate import (
    GateError,
    attention_inputs,
    cached_gate_path,
    gate_for,
    load_gate,
    predicting,
    save_gate,
    train_gate,
)
from uncomp_cli.engine.generation import GenerationSettings
from uncomp_cli.models.loading import load_model
from uncomp_cli.policies.registry import make_policy

CONTEXT = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(40))
SETTINGS = GenerationSettings(max_new_tokens=6)
SMALL = {"window": 4, "kernel": 3}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def gate(loaded):
    return train_gate(loaded, samples=2, seq_len=64)


@pytest.fixture(autouse=True)
def small_training(monkeypatch):
    """gate_for trains on two 64-token windows, not the default six of 2,048."""
    monkeypatch.setattr(gate_module, "GATE_SAMPLES", 2)
    monkeypatch.setattr(gate_module, "GATE_SEQ_LEN", 64)


def test_a_gate_has_a_map_per_layer_from_hidden_state_to_kv_heads(loaded, gate):
    config = loaded.model.config
    assert gate.weights.shape == (config.num_hidden_layers, config.hidden_size + 1, config.num_key_value_heads)
    assert torch.isfinite(gate.weights).all() and gate.weights.abs().sum() > 0
    assert (gate.samples, gate.seq_len) == (2, 64) and gate.training_data.startswith("built-in")


def test_predictions_are_the_linear_map_of_each_layers_attention_input(loaded, gate):
    ids = torch.tensor([list(range(3, 40))])
    inputs = {}

    def keep(layer, hidden):
        inputs[layer] = hidden.clone()

    with attention_inputs(loaded.model, keep), predicting(gate, loaded.model) as predicted, torch.inference_mode():
        loaded.model(ids)
    assert len(predicted) == len(inputs) == loaded.model.config.num_hidden_layers
    for layer, scores in enumerate(predicted):
        weights = gate.weights[layer]
        expected = torch.exp(inputs[layer] @ weights[:-1] + weights[-1]).T
        assert scores.shape == (1, loaded.model.config.num_key_value_heads, ids.shape[1])
        torch.testing.assert_close(scores[0], expected)


def test_a_saved_gate_loads_back_tensor_for_tensor(loaded, gate, tmp_path):
    path = save_gate(gate, tmp_path / "gate.safetensors")
    back = load_gate(path)
    assert torch.equal(back.weights, gate.weights)
    assert (back.model_fingerprint, back.samples, back.seq_len, back.training_data) == \
        (gate.model_fingerprint, gate.samples, gate.seq_len, gate.training_data)
    back.check_model(loaded.model.config)


def test_bad_gate_files_are_one_clear_error(gate, tmp_path):
    good = save_gate(gate, tmp_path / "gate.safetensors").read_bytes()
    for name, data in {"truncated": good[: len(good) // 2], "text": b"hello\n" * 20}.items():
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(GateError, match="is not a score gate file"):
            load_gate(bad)
    with pytest.raises(GateError, match="not this model"):
        gate.check_model(tiny_config("llama", 4, 4))


def test_the_gate_is_trained_once_cached_and_a_damaged_one_replaced(loaded, caplog):
    first = gate_for(loaded)
    path = cached_gate_path(loaded.model.config)
    assert path.is_file()
    assert torch.equal(gate_for(loaded).weights, first.weights)  # from the file
    path.write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        again = gate_for(loaded)
    assert "is not a score gate file" in caplog.text
    assert torch.equal(again.weights, first.weights)  # training is deterministic
    assert load_gate(path).weights.shape == first.weights.shape


@pytest.mark.parametrize("method", ["snapkv", "adakv", "pyramidkv"])
def test_a_gated_context_keeps_its_budget_and_a_whole_one_answers_as_the_full_cache(loaded, method):
    options = {k: v for k, v in SMALL.items() if k in make_policy(method).option_names()}
    context = compress_context(loaded, CONTEXT, make_policy(method, budget="24", **options), scorer="gate")
    config = loaded.model.config
    per_token = config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2 * 4
    assert context.kv_cache_bytes() == 24 * per_token
    assert context.stats["context_scorer"] == "gate"
    full = ask(loaded, compress_context(loaded, CONTEXT), "Where is item 12?", SETTINGS)
    whole = compress_context(loaded, CONTEXT, make_policy(method, budget="10000", **options), scorer="gate")
    assert ask(loaded, whole, "Where is item 12?", SETTINGS).token_ids == full.token_ids


def test_a_gate_for_another_depth_is_refused(gate):
    with pytest.raises(GateError, match="layers"):
        with predicting(gate, tiny_model("llama-gqa", layers=2)):
            pass


def test_a_shared_gate_reading_compresses_as_a_fresh_prefill(loaded):
    from uncomp_cli.contexts.compress import compress_ids, reading_store
    from uncomp_cli.models.prompting import context_prompt

    ids, tail = context_prompt(loaded.tokenizer, CONTEXT)
    readings = reading_store(1 << 30)
    compress_ids(loaded, ids, make_policy("snapkv", budget="24", **SMALL), "gate", tail, readings)
    compress_ids(loaded, ids, make_policy("snapkv", budget="24", **SMALL), "reconstruct", tail, readings)
    assert len(readings) == 2 and readings.hits == 0  # a re-reading is not a gate's reading
    shared = compress_ids(loaded, ids, make_policy("snapkv", budget="12", **SMALL), "gate", tail, readings)
    assert readings.hits == 1
    fresh = compress_ids(loaded, ids, make_policy("snapkv", budget="12", **SMALL), "gate", tail)
    assert shared.kv_cache_bytes() == fresh.kv_cache_bytes() and shared.stats == fresh.stats
    assert ask(loaded, shared, "Where is item 3?", SETTINGS).token_ids == \
        ask(loaded, fresh, "Where is item 3?", SETTINGS).token_ids


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_answer(loaded, monkeypatch, caplog):
    def refuse(gate, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gate_module, "save_gate", refuse)
    with caplog.at_level(logging.WARNING):
        made = gate_for(loaded)
    assert made.weights.shape[0] == loaded.model.config.num_hidden_layers
    assert "cannot cache the score gate" in caplog.text and "Permission denied" in caplog.text
    assert not cached_gate_path(loaded.model.config).exists()
