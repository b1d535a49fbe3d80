"""8-bit keys and values (engine/quantise.py): rounding bounds, storage that holds fewer bytes, and
compressed contexts that keep their 8 bits through questions, checkpoints and files."""

from __future__ import annotations

import pytest
import torch

from uncomp_cli.contexts.compress import ask, compress_context
from uncomp_cli.contexts.file import file_metadata, load_context, save_context
from uncomp_cli.engine.generation import GenerationSettings
from uncomp_cli.engine.groups import HeadGroup
from uncomp_cli.engine.quantise import QuantisedBuffer, group_size
from uncomp_cli.errors import UncompError
from uncomp_cli.models.loading import load_model
from uncomp_cli.models.prompting import question_ids
from uncomp_cli.policies.registry import make_policy

CONTEXT = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(40))
SMALL = {"window": 4, "kernel": 3}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def _step(values: torch.Tensor) -> torch.Tensor:
    """Each element's rounding step: its group's range / 255."""
    b, h, t, d = values.shape
    size = group_size(d)
    grouped = values.reshape(b, h, t, d // size, size)
    step = (grouped.amax(-1) - grouped.amin(-1)) / 255
    return step[..., None].expand(-1, -1, -1, -1, size).reshape(b, h, t, d)


@pytest.mark.parametrize("dim", [64, 48, 20])
def test_rounding_errs_by_at_most_half_a_step_and_rounding_again_changes_nothing(dim):
    torch.manual_seed(0)
    values = torch.randn(2, 3, 17, dim) * torch.linspace(0.1, 30, dim)  # channels of very different ranges
    stored = QuantisedBuffer.of(values)
    read = stored.read(17)
    assert read.shape == values.shape and read.dtype == values.dtype
    # half a step, plus what float16 minima and steps add
    assert bool(((read - values).abs() <= 0.5 * _step(values) * 1.01 + 1e-2 * values.abs().amax()).all())
    again = QuantisedBuffer.of(read)
    assert torch.equal(again.codes, stored.codes) and torch.equal(again.read(17), read)


def test_a_constant_vector_reads_back_exactly():
    values = torch.full((1, 1, 3, 64), 1.5)
    assert torch.equal(QuantisedBuffer.of(values).read(3), values)


def test_an_8_bit_group_holds_a_byte_a_number_and_its_steps():
    torch.manual_seed(0)
    group = HeadGroup([0, 1], 8)
    keys, values = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    valid, positions = torch.ones(1, 2, 8, dtype=torch.bool), torch.arange(8).expand(1, 2, 8)
    group.store(keys, values, valid, positions)
    float32_bytes = group.nbytes()
    group.quantise(8)
    # per token and head: 64 codes + 2 groups × (minimum, step) in float16 = 72 bytes, for K and for V
    assert group.nbytes() == 2 * 2 * 8 * 72 == float32_bytes * 72 // 256
    assert (group.keys - keys).abs().max() < 0.05 and group.keys.dtype == torch.float32


def _rounded_group(batch: int, tokens: int, seed: int) -> HeadGroup:
    """One KV head of ``tokens`` random 32-channel keys and values per row, held at 8 bits."""
    torch.manual_seed(seed)
    group = HeadGroup([0], tokens)
    group.store(torch.randn(batch, 1, tokens, 32), torch.randn(batch, 1, tokens, 32),
                torch.ones(batch, 1, tokens, dtype=torch.bool), torch.arange(tokens).expand(batch, 1, tokens))
    group.quantise(8)
    return group


def test_appends_to_an_8_bit_group_grow_it_and_a_snapshot_keeps_what_it_held():
    group = _rounded_group(batch=1, tokens=4, seed=1)
    saved = group.snapshot()
    before = saved.keys.clone()
    new_keys, new_values = torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32)
    for t in range(40):  # one token at a time, through several growths
        group.append(new_keys[:, :, t:t + 1], new_values[:, :, t:t + 1], torch.ones(1, 1, 1, dtype=torch.bool),
                     torch.full((1, 1, 1), 4 + t), True)
    assert group.length() == 44 and group.capacity() >= 44
    assert torch.equal(group.keys[:, :, 4:], QuantisedBuffer.of(new_keys).read(40))
    assert torch.equal(group.values[:, :, 4:], QuantisedBuffer.of(new_values).read(40))
    assert torch.equal(saved.keys, before) and saved.length() == 4
    assert group.reserved_nbytes() >= group.nbytes() > 0


def test_an_8_bit_group_maps_its_codes_over_the_batch_without_rounding_again():
    group = _rounded_group(batch=2, tokens=5, seed=2)
    keys, values, held = group.keys, group.values, group.nbytes()
    group.map_batch(lambda t: t.index_select(0, torch.tensor([1, 1, 0])))  # beam search's reordering
    assert torch.equal(group.keys, keys[[1, 1, 0]]) and torch.equal(group.values, values[[1, 1, 0]])
    assert group.bits == 8 and group.nbytes() == held * 3 // 2


def _question_logits(loaded, context, question: str) -> torch.Tensor:
    """The next-token logits after ``question`` on ``context`` (which returns to itself)."""
    ids = question_ids(loaded.tokenizer, question, context.tail)
    total = context.context_tokens + len(ids)
    try:
        with context.policy.resume(loaded.model, context.cache) as cache, torch.inference_mode():
            out = loaded.model(torch.tensor([ids]), attention_mask=torch.ones(1, total, dtype=torch.long),
                               position_ids=torch.arange(context.context_tokens, total)[None], past_key_values=cache)
    finally:
        context.restore()
    return out.logits[0, -1]


@pytest.mark.parametrize("scorer", ["window", "reconstruct"])
def test_an_8_bit_context_holds_fewer_bytes_and_answers_as_the_rounding_allows(loaded, scorer):
    policy = make_policy("snapkv", budget="24", **SMALL)
    plain = compress_context(loaded, CONTEXT, policy, scorer=scorer)
    rounded = compress_context(loaded, CONTEXT, policy, scorer=scorer, kv_bits=8)
    # the same tokens kept, at 72 of 256 bytes a number's worth (head size 64 at float32)
    for plain_layer, rounded_layer in zip(plain.cache.layers, rounded.cache.layers):
        for a, b in zip(plain_layer.groups, rounded_layer.groups):
            assert torch.equal(a.positions, b.positions)
            assert torch.equal(b.keys, QuantisedBuffer.of(a.keys).read(a.length()))
    head_dim = loaded.model.config.hidden_size // loaded.model.config.num_attention_heads
    expected = plain.kv_cache_bytes() * (head_dim + 4 * head_dim // group_size(head_dim)) // (4 * head_dim)
    assert rounded.kv_cache_bytes() == expected < plain.kv_cache_bytes()
    assert rounded.stats["kv_bits"] == 8 and "kv_bits" not in plain.stats
    a, b = _question_logits(loaded, plain, "Where is item 12?"), _question_logits(loaded, rounded, "Where is item 12?")
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.05 * float(a.abs().max()))
    held = rounded.kv_cache_bytes()
    first = ask(loaded, rounded, "Which box holds item 30?", GenerationSettings(max_new_tokens=5))
    again = ask(loaded, rounded, "Which box holds item 30?", GenerationSettings(max_new_tokens=5))
    assert first.token_ids == again.token_ids and rounded.kv_cache_bytes() == held


def test_an_8_bit_context_file_is_smaller_and_answers_as_the_context_in_memory(loaded, tmp_path):
    policy = make_policy("snapkv", budget="24", **SMALL)
    plain = compress_context(loaded, CONTEXT, policy)
    rounded = compress_context(loaded, CONTEXT, policy, kv_bits=8)
    save_context(plain, loaded, tmp_path / "plain.uncomp")
    save_context(rounded, loaded, tmp_path / "rounded.uncomp")
    from safetensors.torch import load_file

    def tensor_bytes(name: str) -> int:
        return sum(t.numel() * t.element_size() for t in load_file(tmp_path / name).values())

    # the file keeps the saving: its tensors are smaller by exactly what the cache in memory saves
    assert tensor_bytes("plain.uncomp") - tensor_bytes("rounded.uncomp") == \
        plain.kv_cache_bytes() - rounded.kv_cache_bytes() > 0
    assert (tmp_path / "rounded.uncomp").stat().st_size < (tmp_path / "plain.uncomp").stat().st_size
    versions = [file_metadata((tmp_path / name).read_bytes())["format_version"]
                for name in ("plain.uncomp", "rounded.uncomp")]
    assert versions == ["1", "2"]  # a file without 8-bit groups stays readable by older versions
    back = load_context(loaded, tmp_path / "rounded.uncomp")
    assert back.kv_cache_bytes() == rounded.kv_cache_bytes()
    for a, b in zip(rounded.cache.layers, back.cache.layers):
        assert all(g.bits == 8 for g in b.groups)
        assert all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.groups, b.groups))
    settings = GenerationSettings(max_new_tokens=5)
    assert ask(loaded, back, "Where is item 3?", settings).token_ids == \
        ask(loaded, rounded, "Where is item 3?", settings).token_ids


def test_a_damaged_8_bit_file_is_one_clear_error(loaded, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "rounded.uncomp"
    save_context(compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL), kv_bits=8),
                 loaded, path)
    tensors, metadata = load_file(path), file_metadata(path.read_bytes())
    tensors["layers.0.groups.0.keys.step"] = tensors["layers.0.groups.0.keys.step"][..., :1, :]
    save_file(tensors, tmp_path / "bad.uncomp", metadata=metadata)
    with pytest.raises(UncompError, match="is damaged"):
        load_context(loaded, tmp_path / "bad.uncomp")


def test_kv_bits_is_refused_for_the_full_cache_and_for_other_widths(loaded):
    with pytest.raises(UncompError, match="--kv-bits rounds a compressed cache"):
        compress_context(loaded, CONTEXT, make_policy("full"), kv_bits=8)
    with pytest.raises(UncompError, match="--kv-bits must be 8"):
        compress_context(loaded, CONTEXT, make_policy("snapkv", budget="24", **SMALL), kv_bits=4)
