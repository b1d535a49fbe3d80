"""Shared fixtures: tiny random models built from configs (no downloads), isolated user state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny import HAYSTACK_DIR, tiny_model, tiny_tokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from uncomp_cli.cli.app import app  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local Hugging Face model directory (config, weights, tokenizer) of a tiny random Llama."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_user_state(tmp_path, monkeypatch):
    """Keep caches and profiles that tests write out of the user's home."""
    monkeypatch.setenv("UNCOMP_CACHE", str(tmp_path / "uncomp-cache"))
    monkeypatch.delenv("UNCOMP_MODEL", raising=False)


@pytest.fixture(scope="session")
def haystack_dir() -> Path:
    if not HAYSTACK_DIR.is_dir():
        pytest.skip("../shared/data/haystack is not present")
    return HAYSTACK_DIR


@pytest.fixture(scope="session")
def tiny_profile(tiny_model_dir, tmp_path_factory):
    """A profile calibrated on the tiny model (2 windows of 64 tokens of the built-in source)."""
    path = tmp_path_factory.mktemp("profiles") / "tiny.safetensors"
    result = CliRunner().invoke(app, ["calibrate", "-m", str(tiny_model_dir), "--samples", "2", "--seq-len", "64",
                                      "--out", str(path)])
    assert result.exit_code == 0, result.stderr
    return path
