"""Calibration of the embedded SmolLM2-135M with small settings, through the real CLI app."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from uncomp_cli.errors import ProfileError
from uncomp_cli.profile.file import load_profile


@pytest.mark.slow
def test_calibrate_the_embedded_model_and_inspect_it(embedded, haystack_dir, tmp_path, monkeypatch):
    from uncomp_cli.cli import calibration
    from uncomp_cli.cli.app import app

    monkeypatch.setattr(calibration, "_load_model", lambda spec, device, dtype: embedded)  # loaded once per session
    out = tmp_path / "smollm.safetensors"
    result = CliRunner().invoke(
        app,
        ["calibrate", "--data", str(haystack_dir), "--samples", "2", "--seq-len", "256", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    profile = load_profile(out)
    assert (profile.num_layers, profile.num_heads, profile.num_kv_heads, profile.head_dim) == (30, 9, 3, 64)
    assert profile.entropy_rank_k == 16 and profile.groups == 2
    assert 1 <= profile.num_stages <= 5 and int(profile.layer_stage[0]) == 0
    assert bool(((profile.head_entropy > 0) & (profile.head_entropy < 1)).all())
    profile.check_model(embedded.model.config, embedded.name)
    llama_8b = SimpleNamespace(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with pytest.raises(
        ProfileError, match=r"profile is for 30 layers × 3 KV heads \(smollm2-135m\); this model has 32 × 8"
    ):
        profile.check_model(llama_8b)

    report = CliRunner().invoke(app, ["inspect-heads", str(out), "--json"])
    assert report.exit_code == 0, report.output
    assert len(json.loads(report.stdout)["heads"]) == 30 * 9
