"""The generation loop: token-for-token agreement with transformers, sampling, stopping, streaming."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_SHAPES, tiny_model, tiny_tokenizer
from transformers import DynamicCache

from uncomp_cli.engine.cache import cache_nbytes
from uncomp_cli.engine.generation import (
    GenerationSettings,
    TextStream,
    full_kv_cache_bytes,
    generate_ids,
    pick_tokens,
)

PROMPT = [1, 17, 42, 99, 7, 250, 31, 8, 64, 12, 5, 77]


@pytest.mark.parametrize("shape", sorted(TINY_SHAPES))
def test_greedy_matches_model_generate(shape):
    model = tiny_model(shape)
    input_ids = torch.tensor([PROMPT])
    mask = torch.ones_like(input_ids)
    ours = generate_ids(model, input_ids, mask, GenerationSettings(max_new_tokens=16), eos_ids=[])
    reference = model.generate(input_ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                               do_sample=False, pad_token_id=0)
    assert ours.tokens[0] == reference[0, len(PROMPT):].tolist()


def test_batch_with_left_padding_matches_each_prompt_alone():
    model = tiny_model("llama-gqa", seed=3)
    short, long = PROMPT[:5], PROMPT
    alone = [generate_ids(model, torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long),
                          GenerationSettings(max_new_tokens=10), eos_ids=[]).tokens[0] for p in (short, long)]
    pad = len(long) - len(short)
    input_ids = torch.tensor([[0] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    batched = generate_ids(model, input_ids, mask, GenerationSettings(max_new_tokens=10), eos_ids=[])
    assert batched.tokens == alone


def test_generation_stops_at_end_of_sequence_token_per_row():
    model = tiny_model("llama-gqa")
    input_ids = torch.tensor([PROMPT])
    mask = torch.ones_like(input_ids)
    free = generate_ids(model, input_ids, mask, GenerationSettings(max_new_tokens=8), eos_ids=[]).tokens[0]
    stopped = generate_ids(model, input_ids, mask, GenerationSettings(max_new_tokens=8), eos_ids=[free[3]]).tokens[0]
    assert stopped == free[: free.index(free[3])]


def test_sampling_is_reproducible_with_a_seed_and_top_p_tiny_is_greedy():
    model = tiny_model("llama-gqa")
    input_ids = torch.tensor([PROMPT])
    mask = torch.ones_like(input_ids)

    def run(**kw):
        return generate_ids(model, input_ids, mask, GenerationSettings(max_new_tokens=12, **kw), eos_ids=[]).tokens[0]

    assert run(temperature=1.5, seed=7) == run(temperature=1.5, seed=7)
    assert run(temperature=1.5, seed=7) != run(temperature=1.5, seed=8)
    assert run(temperature=1.0, top_p=1e-6, seed=1) == run()


def test_pick_tokens_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    picks = {int(pick_tokens(logits, GenerationSettings(temperature=1.0, top_p=0.7), gen)) for _ in range(200)}
    assert picks == {0, 1}


def test_full_cache_bytes_match_the_formula():
    model = tiny_model("qwen2-gqa")
    input_ids = torch.tensor([PROMPT])
    out = generate_ids(model, input_ids, torch.ones_like(input_ids), GenerationSettings(max_new_tokens=4), eos_ids=[])
    cfg = model.config
    seen = len(PROMPT) + 3  # the last new token is never fed back
    assert out.full_kv_cache_bytes == cfg.num_hidden_layers * cfg.num_key_value_heads * seen * cfg.head_dim * 2 * 4
    assert out.kv_cache_bytes == out.full_kv_cache_bytes
    cache = DynamicCache(config=cfg)
    assert cache_nbytes(cache) == 0
    assert full_kv_cache_bytes(cfg, 2, 10, torch.bfloat16) == cfg.num_hidden_layers * 2 * 2 * 10 * 16 * 2 * 2


@pytest.mark.parametrize("text", ["plain ascii words", "naïve café — 東京 🚀 done"])
def test_text_stream_deltas_join_to_the_full_decode(text):
    tok = tiny_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in d for d in deltas)


def test_invalid_settings_are_user_errors():
    from uncomp_cli.errors import UncompError

    for bad in (GenerationSettings(max_new_tokens=0), GenerationSettings(temperature=-1),
                GenerationSettings(top_p=0)):
        with pytest.raises(UncompError):
            bad.validate()


def test_the_full_cache_of_a_sliding_window_model_holds_its_window_on_those_layers():
    from tiny import tiny_config

    cfg = tiny_config("gemma2", 4, 2)  # sliding (window 12) and full layers in turn
    per_token = 2 * 2 * 16 * 2 * 4  # batch 2 × KV heads × head_dim × K and V × float32
    assert full_kv_cache_bytes(cfg, 2, 40, torch.float32) == per_token * (11 + 40 + 11 + 40)  # window 12
    assert full_kv_cache_bytes(cfg, 2, 5, torch.float32) == per_token * 5 * 4
