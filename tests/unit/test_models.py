"""Model resolution and the GGUF conversion cache."""

from __future__ import annotations

import pytest
import torch
from gguf_writer import write_tiny_gguf
from tiny import tiny_tokenizer

from uncomp_cli.errors import ModelNotFoundError, UncompError
from uncomp_cli.models import loading as models


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny-llama.gguf", tiny_tokenizer())


def test_embedded_default_resolves_to_the_packaged_gguf():
    source = models.resolve_model(None)
    assert source.kind == "embedded" and source.name == "smollm2-135m"
    assert source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_env_variable_chooses_the_model(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("UNCOMP_MODEL", str(tiny_model_dir))
    assert models.resolve_model(None).kind == "dir"


@pytest.mark.parametrize("spec, message", [
    ("./does/not/exist", "no such file or folder"),
    ("/nope.gguf", "no such file or folder"),
    ("not-a-model-name", "unknown model 'not-a-model-name'"),
])
def test_unknown_models_name_the_alternatives(spec, message):
    with pytest.raises(ModelNotFoundError, match=message) as info:
        models.resolve_model(spec)
    assert "smollm2-135m" in str(info.value)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        models.resolve_model(str(tmp_path))


def test_hub_id_is_recognised_and_fails_clearly_offline(monkeypatch):
    assert models.resolve_model("org/some-model").kind == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hub is not reachable.*local model directory"):
        models.load_model("org/some-model", device="cpu")


def test_gguf_is_converted_once_into_the_cache(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("UNCOMP_CACHE", str(tmp_path / "cache"))
    first = models.load_model(str(tiny_gguf), device="cpu")
    assert first.converted_now and first.source.kind == "gguf"
    target = models.converted_dir(first.source)
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()
    second = models.load_model(str(tiny_gguf), device="cpu")
    assert not second.converted_now
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert first.model.config.num_key_value_heads == 2


def test_interrupted_conversion_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setenv("UNCOMP_CACHE", str(tmp_path / "cache"))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    source = models.resolve_model(str(tiny_gguf))
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(source)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_device_and_dtype_choices():
    assert models.resolve_device("cpu") == torch.device("cpu")
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UncompError, match="invalid dtype"):
        models.resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(UncompError, match="invalid device"):
        models.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UncompError, match="CUDA is not available"):
            models.resolve_device("cuda")


def test_local_folder_loads_in_eval_mode(tiny_model_dir):
    loaded = models.load_model(str(tiny_model_dir), device="cpu")
    assert loaded.source.kind == "dir" and not loaded.model.training
    assert loaded.dtype == torch.float32
