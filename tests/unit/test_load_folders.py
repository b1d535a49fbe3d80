"""Every supported architecture saved to a folder loads through ``load_model`` and generates.

The other tests build models in memory and set their attention themselves, so they never meet the
loader's choice of attention implementation (Gemma 2 refuses SDPA: its attention logits are soft-capped).
"""

from __future__ import annotations

import pytest
from tiny import TINY_SHAPES, tiny_model, tiny_tokenizer
from typer.testing import CliRunner

from uncomp_cli.cli.app import app
from uncomp_cli.engine.attention import SUPPORTED_MODEL_TYPES
from uncomp_cli.engine.generation import GenerationSettings, generate
from uncomp_cli.models.loading import load_model
from uncomp_cli.policies.registry import make_policy

#: model_type -> the first tiny shape of that architecture.
SHAPE_OF = {model_type: name for name, (model_type, _, _) in reversed(TINY_SHAPES.items())}
#: 37 tokens of the tiny tokenizer: past Gemma's 12-token and Phi-3's 16-token sliding windows.
PROMPT = "a brown fox said hello to the capital of France, then the world said it is quick"
SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module", params=SUPPORTED_MODEL_TYPES)
def folder(request, tmp_path_factory):
    """A saved tiny random model of one architecture, with a tokenizer (the loader loads both)."""
    path = tmp_path_factory.mktemp("saved") / request.param  # the folder is named after its model_type
    tok = tiny_tokenizer()
    tiny_model(SHAPE_OF[request.param], vocab_size=len(tok), layers=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder), device="cpu")


def test_every_supported_architecture_has_a_tiny_shape():
    assert set(SUPPORTED_MODEL_TYPES) <= set(SHAPE_OF)


def test_attention_is_sdpa_where_the_architecture_supports_it_else_eager(loaded, folder):
    model = loaded.model
    assert loaded.source.kind == "dir" and model.config.model_type == folder.name
    assert model.config._attn_implementation == ("sdpa" if type(model)._supports_sdpa else "eager")


def test_compressed_methods_run_on_the_loaded_attention_and_put_it_back(loaded):
    own = loaded.model.config._attn_implementation
    full = generate(loaded, PROMPT, SETTINGS, make_policy("full"), raw=True)
    assert full.prompt_tokens == 37 and full.new_tokens >= 1
    keep_all = generate(loaded, PROMPT, SETTINGS, make_policy("snapkv", budget="10000"), raw=True)
    assert keep_all.token_ids == full.token_ids
    small = generate(loaded, PROMPT, SETTINGS, make_policy("snapkv", budget="4", window=2, kernel=3), raw=True)
    assert small.new_tokens >= 1 and small.kv_cache_bytes < full.kv_cache_bytes
    assert loaded.model.config._attn_implementation == own


@pytest.mark.parametrize("folder", ["gemma2"], indirect=True)
def test_generate_command_loads_a_gemma2_folder(folder):
    result = CliRunner().invoke(app, ["generate", "-m", str(folder), "--method", "full", "--max-new-tokens", "2",
                                      "--raw", "hi"])
    assert result.exit_code == 0, result.stderr
