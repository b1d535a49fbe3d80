"""Profile: safetensors round trip, atomic writes, refusal of bad files, validation against a model."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from uncomp_cli.errors import ProfileError
from uncomp_cli.profile.calibrate import group_budget_shares, group_sizes, stage_keep_fractions
from uncomp_cli.profile.file import (
    Profile,
    fingerprint_fields,
    load_profile,
    model_fingerprint,
    save_profile,
)


def smollm_config(**overrides):
    fields = dict(
        model_type="llama",
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_size=576,
        vocab_size=49152,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def make_profile(config=None, samples: int = 3, groups: int = 2, seed: int = 0) -> Profile:
    """A synthetic but self-consistent profile (no model needed)."""
    config = config or smollm_config()
    L, H, Hkv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    sample = torch.rand(samples, L, H, generator=g)
    kv = sample.reshape(samples, L, Hkv, H // Hkv).mean(-1)
    stages = torch.tensor([min(2, layer // max(1, L // 3)) for layer in range(L)], dtype=torch.int64)
    group = kv.mean(0).argsort(-1).argsort(-1) * groups // Hkv
    return Profile(
        model="smollm2-135m",
        model_fingerprint=model_fingerprint(config),
        model_config=fingerprint_fields(config),
        num_layers=L,
        num_heads=H,
        num_kv_heads=Hkv,
        head_dim=config.head_dim,
        entropy_rank_k=16,
        entropy_source="query",
        kv_aggregation="mean",
        grouping="vote",
        seq_len=256,
        samples=samples,
        calibration_data="test text (10 characters)",
        calibration_data_sha256="ab" * 32,
        stage_threshold=0.015,
        groups=groups,
        layer_entropy=sample.mean((0, 2)),
        head_entropy=sample.mean(0),
        head_entropy_std=sample.std(0, correction=0),
        kv_head_entropy=kv.mean(0),
        kv_head_entropy_std=kv.std(0, correction=0),
        sample_head_entropy=sample,
        layer_stage=stages,
        stage_keep_fraction=stage_keep_fractions(int(stages.max()) + 1),
        kv_head_group=group.to(torch.int64),
        kv_head_votes=torch.nn.functional.one_hot(group, groups).to(torch.int64) * samples,
        group_budget_share=group_budget_shares(groups, group_sizes(Hkv, groups)),
        uncomp_version="0.1.0",
        created="2025-01-01T00:00:00+00:00",
    )


@pytest.fixture
def profile_file(tmp_path) -> Path:
    return save_profile(make_profile(), tmp_path / "smollm.safetensors")


def test_round_trip_keeps_every_tensor_and_field(tmp_path):
    original = make_profile()
    loaded = load_profile(save_profile(original, tmp_path / "p.safetensors"))
    for name, tensor in original.tensors().items():
        assert torch.equal(getattr(loaded, name), tensor), name
    assert loaded.metadata() == original.metadata()
    assert loaded.model_config == original.model_config


def test_metadata_has_the_documented_keys(profile_file):
    from safetensors import safe_open

    with safe_open(str(profile_file), framework="pt") as handle:
        meta = handle.metadata()
    required = {
        "format",
        "format_version",
        "model",
        "model_fingerprint",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "entropy_rank_k",
        "entropy_source",
        "seq_len",
        "samples",
        "calibration_data",
        "calibration_data_sha256",
        "stage_threshold",
        "groups",
        "uncomp_version",
        "created",
    }
    assert required <= set(meta)
    assert meta["format"] == "uncomp-profile" and meta["format_version"] == "1"


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "p.safetensors"
    target.write_bytes(b"previous contents")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(ProfileError, match="No space left on device"):
        save_profile(make_profile(), target)
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_save_into_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        save_profile(make_profile(), tmp_path / "nowhere" / "p.safetensors")


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -200, -1])
def test_truncated_profile_is_one_clear_error(profile_file, keep):
    data = profile_file.read_bytes()
    profile_file.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ProfileError) as excinfo:
        load_profile(profile_file)
    assert str(excinfo.value) == f"{profile_file} is not a readable safetensors file (truncated or corrupt)"


def test_garbage_is_one_clear_error(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(3000))
    with pytest.raises(ProfileError, match="not a readable safetensors file"):
        load_profile(path)


def test_other_safetensors_file_is_not_a_profile(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ProfileError) as excinfo:
        load_profile(path)
    assert (
        str(excinfo.value) == f"{path} is a safetensors file but not an uncomp profile (no 'uncomp-profile' metadata)"
    )


def test_newer_format_version_asks_for_an_upgrade(tmp_path):
    profile = make_profile()
    meta = profile.metadata() | {"format_version": "99"}
    path = tmp_path / "future.safetensors"
    save_file(profile.tensors(), str(path), metadata=meta)
    with pytest.raises(ProfileError, match="format version 99; this uncomp reads up to 1"):
        load_profile(path)


def test_missing_tensor_or_wrong_shape_is_refused(tmp_path):
    profile = make_profile()
    tensors = profile.tensors()
    del tensors["kv_head_group"]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, str(path), metadata=profile.metadata())
    with pytest.raises(ProfileError, match="missing tensor 'kv_head_group'"):
        load_profile(path)
    tensors = profile.tensors() | {"head_entropy": torch.zeros(30, 8)}
    save_file(tensors, str(path), metadata=profile.metadata())
    with pytest.raises(ProfileError, match=r"tensor 'head_entropy' has shape \[30, 8\], expected \[30, 9\]"):
        load_profile(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ProfileError, match="profile not found"):
        load_profile(tmp_path / "absent.safetensors")
    with pytest.raises(ProfileError, match="is a folder"):
        load_profile(tmp_path)


def test_check_model_accepts_the_model_it_was_made_for():
    make_profile().check_model(smollm_config(), "smollm2-135m")


def test_check_model_refuses_another_shape_in_one_line():
    profile = make_profile()
    other = smollm_config(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with pytest.raises(ProfileError) as excinfo:
        profile.check_model(other)
    assert str(excinfo.value) == "profile is for 30 layers × 3 KV heads (smollm2-135m); this model has 32 × 8"
    with pytest.raises(ProfileError, match=r"this model \(llama-3-8b\) has 32 × 8"):
        profile.check_model(other, "llama-3-8b")
    with pytest.raises(ProfileError, match="9 query heads of size 64"):
        profile.check_model(smollm_config(num_attention_heads=6))


def test_check_model_refuses_a_different_configuration_unless_lenient(caplog):
    profile = make_profile()
    other_rope = smollm_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(ProfileError, match="rope"):
        profile.check_model(other_rope)
    profile.check_model(other_rope, strict=False)
    assert "rope" in caplog.text


def test_fingerprint_depends_on_the_fields_that_matter():
    assert model_fingerprint(smollm_config()) == model_fingerprint(smollm_config())
    assert model_fingerprint(smollm_config()) != model_fingerprint(smollm_config(vocab_size=32000))
    assert model_fingerprint(smollm_config()) == model_fingerprint(smollm_config(torch_dtype="bfloat16"))
    assert len(model_fingerprint(smollm_config())) == 64


def test_kv_head_budgets_spread_the_average_by_group():
    profile = make_profile()  # 3 KV heads, 2 groups: sizes [2, 1], shares [0.75, 1.5]
    budgets = profile.kv_head_budgets(120, prompt_len=10_000)
    assert budgets.shape == (30, 3) and budgets.dtype == torch.int64
    assert torch.all(budgets.sum(-1) == 360)  # mean per layer is the average budget
    high = budgets[profile.kv_head_group == 1]
    low = budgets[profile.kv_head_group == 0]
    assert torch.all(high == 180) and torch.all(low == 90)


def test_kv_head_budgets_are_clipped_to_the_tokens_a_layer_holds():
    profile = make_profile()
    assert int(profile.kv_head_budgets(120, prompt_len=100).max()) == 100
    per_layer = torch.arange(1, 31) * 10
    budgets = profile.kv_head_budgets(1000, prompt_len=per_layer)
    assert torch.all(budgets <= per_layer[:, None])
    assert int(profile.kv_head_budgets(0.1, prompt_len=50).min()) == 1
    with pytest.raises(ProfileError):
        profile.kv_head_budgets(-1, prompt_len=50)
