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
@pytest.mark.parametrize("method", ["snapkv", "uncomp-uniform"])
def test_on_cuda_the_grouped_cache_keeping_everything_matches_the_dynamic_cache(method, dtype):
    model = _half("llama-gqa", dtype, "cuda")
    ids, mask = (t.cuda() for t in left_padded([30, 21], seed=6))
    ref_logits, ref_tokens = greedy(model, ids, mask, DynamicCache(config=model.config), steps=4)
    options = {"budget": "10000", "prefill_compression": False} if method != "snapkv" else {"budget": "10000"}
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
