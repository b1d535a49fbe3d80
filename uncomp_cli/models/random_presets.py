"""Random-initialised models with the shapes of real ones, for speed and memory work without weights.

Timing and memory depend on a model's shapes (layers, heads, KV heads, head size, MLP width,
vocabulary), not on what its weights learned, so ``uncomp bench --model-config llama3-8b`` measures
an 8B-shaped model on a machine that has no copy of the weights. Nothing is downloaded. Every
report names such a model ``random <preset> (not trained weights; speed only)``: its outputs are
noise and must never be read as quality.

Compressed methods that need a profile get :func:`uncomp_cli.profile.reference.reference_profile`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from uncomp_cli.errors import UncompError
from uncomp_cli.memory import available_memory_bytes
from uncomp_cli.models.loading import LoadedModel, ModelSource, resolve_device, resolve_dtype

# name -> (model_type, config fields). Shapes as published in each model's config.json.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b": ("llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
    )),
    "llama3.2-1b": ("llama", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True,
    )),
    "mistral-7b": ("mistral", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, sliding_window=None,
        tie_word_embeddings=False,
    )),
    "qwen2-0.5b": ("qwen2", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        sliding_window=None, tie_word_embeddings=True,
    )),
    "qwen2-7b": ("qwen2", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, use_sliding_window=False,
        sliding_window=None, tie_word_embeddings=False,
    )),
    # Milliseconds per forward pass on a CPU: for tests and trying the command out.
    "tiny": ("llama", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=16384,
        tie_word_embeddings=False,
    )),
}


def random_model_label(preset: str, layers: int | None = None) -> str:
    """The name every output gives a random model, so its numbers are never mistaken for a real one's."""
    depth = ""
    if layers is not None and layers != PRESETS[preset][1]["num_hidden_layers"]:
        depth = f", {layers} of {PRESETS[preset][1]['num_hidden_layers']} layers"
    return f"random {preset}{depth} (not trained weights; speed only)"


def preset_config(preset: str, layers: int | None = None):
    """The transformers config of ``preset``, with ``layers`` decoder layers if given (to shrink depth)."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise UncompError(f"unknown model config {preset!r}; available: {', '.join(PRESETS)}")
    model_type, fields = PRESETS[preset]
    fields = dict(fields)
    if layers is not None:
        full = fields["num_hidden_layers"]
        if not 1 <= layers <= full:
            raise UncompError(f"--layers must be 1 to {full} for {preset}, got {layers}")
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=2, pad_token_id=0, **fields)


def parameter_count(config) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(preset: str, config, device: torch.device, dtype: torch.dtype) -> int:
    """Refuse, before allocating, a random model whose weights alone exceed the memory available.

    Returns the weights' size in bytes.
    """
    weights = parameter_count(config) * torch.empty((), dtype=dtype).element_size()
    available = available_memory_bytes(device)
    if weights > available:
        dtype_name = str(dtype).removeprefix("torch.")
        raise UncompError(
            f"random {preset} needs {_gib(weights)} for its weights in {dtype_name} but {device} has "
            f"{_gib(available)} available; use --layers N, a smaller --dtype or a smaller preset"
        )
    return weights


def load_random_model(preset: str, layers: int | None = None, device: str = "auto", dtype: str = "auto",
                      seed: int = 0) -> LoadedModel:
    """A seeded random-initialised model of ``preset``'s shapes, built directly on ``device``.

    No tokenizer: benchmarks feed token ids. Raises :class:`UncompError` if the weights do not fit.
    """
    from transformers import AutoModelForCausalLM

    config = preset_config(preset, layers)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_fits(preset, config, dev, torch_dtype)
    config._attn_implementation = "sdpa"
    started = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return LoadedModel(
        model=model.eval(),
        tokenizer=None,
        name=random_model_label(preset, layers),
        device=dev,
        dtype=torch_dtype,
        source=ModelSource(preset, "random", preset),
        load_seconds=time.perf_counter() - started,
    )
