"""Half precision and CUDA: the grouped cache in bfloat16 on the CPU, and on a GPU when there is one
(tests marked ``gpu`` are skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from kvloop import greedy, left_padded
from tiny import tiny_model
from transformers import DynamicCache

from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.policies.registry import make_policy

SHAPES = ["llama-gqa", "gemma3-gqa"]


def _half(shape: str, dtype: torch.dtype, device: str = "cpu"):
    return tiny_model(shape, seed=6).to(device=device, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_keeping_every_token_decodes_as_the_dynamic_cache_does(shape):
    model = _half(shape, torch.bfloat16)
    ids, mask = left_padded([30, 21], seed=6)
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=4)
    with make_policy("snapkv", budget="10000").attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=0.02, rtol=0)  # bfloat16 keeps ~3 digits
    assert torch.equal(tokens, ref_tokens)


def test_a_bfloat16_cache_stores_bfloat16_at_half_the_bytes_of_float32():
    ids, mask = left_padded([40], seed=6)
    held = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _half("llama-gqa", dtype)
        with make_policy("snapkv", budget="16", window=4, kernel=3).attach(model, mask) as cache:
            greedy(model, ids, mask, cache, steps=2)
            held[dtype] = cache_nbytes(cache)
            assert {group.keys.dtype for layer in cache.layers for group in layer.groups} == {dtype}
    assert held[torch.bfloat16] * 2 == held[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["snapkv", "uncomp"])
def test_on_cuda_the_grouped_cache_keeping_everything_matches_the_dynamic_cache(method, dtype):
    model = _half("llama-gqa", dtype, "cuda")
    ids, mask = (t.cuda() for t in left_padded([30, 21], seed=6))
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=4)
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    options = {"budget": "10000"} if method == "snapkv" else {"kv_head_budgets": torch.full(shape, 10000)}
    with make_policy(method, **options).attach(model, mask) as cache:
        logits, tokens = greedy(model, ids, mask, cache, steps=4)
    torch.testing.assert_close(logits.float(), ref_logits.float(), atol=0.05, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_with_uncomp_on_cuda(tiny_model_dir):
    from uncomp_cli.engine.generation import GenerationSettings, generate
    from uncomp_cli.models.loading import load_model
    from uncomp_cli.policies.registry import with_profile

    loaded = load_model(str(tiny_model_dir), device="cuda", dtype="bfloat16")
    policy = with_profile(make_policy("uncomp", budget="50%", window=4, kernel=3), loaded)
    result = generate(loaded, "The capital of France is", GenerationSettings(max_new_tokens=6), policy)
    assert result.device.startswith("cuda") and result.dtype == "bfloat16"
    assert 1 <= result.new_tokens <= 6 and result.kv_cache_bytes < result.full_kv_cache_bytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scorer", ["reconstruct", "gate"])
def test_a_context_compressed_on_cuda_keeps_its_budget_and_a_whole_one_answers_as_the_full_cache(
        tiny_model_dir, scorer, monkeypatch):
    from uncomp_cli.contexts import gate as gate_module
    from uncomp_cli.contexts.compress import ask, compress_context
    from uncomp_cli.engine.generation import GenerationSettings
    from uncomp_cli.models.loading import load_model

    monkeypatch.setattr(gate_module, "GATE_SAMPLES", 2)  # the gate trains on the GPU, on a little text
    monkeypatch.setattr(gate_module, "GATE_SEQ_LEN", 64)
    text = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(40))
    settings = GenerationSettings(max_new_tokens=6)
    loaded = load_model(str(tiny_model_dir), device="cuda", dtype="float32")
    small = compress_context(loaded, text, make_policy("snapkv", budget="24", window=4, kernel=3), scorer=scorer)
    config = loaded.model.config
    assert small.kv_cache_bytes() == 24 * config.num_hidden_layers * config.num_key_value_heads * \
        config.head_dim * 2 * 4
    assert all(group.keys.is_cuda for layer in small.cache.layers for group in layer.groups)
    full = ask(loaded, compress_context(loaded, text), "Where is item 12?", settings)
    whole = compress_context(loaded, text, make_policy("snapkv", budget="10000", window=4, kernel=3), scorer=scorer)
    assert ask(loaded, whole, "Where is item 12?", settings).token_ids == full.token_ids
