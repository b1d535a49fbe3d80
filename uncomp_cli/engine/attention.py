"""The attention function of grouped caches, its registration in transformers, and model plumbing.

transformers builds one mask per forward, sized for one length; a grouped cache stores groups of
different lengths with their own per-row validity, so it attends itself. This module registers
``"uncomp"`` as an attention implementation whose function hands each layer's new queries, keys
and values to that layer of the cache (found through a reference set on each attention module),
and whose mask function passes the 2-D padding mask through instead of building a 4-D one.
:func:`use_grouped_cache` installs both for the duration of a run and puts the model's back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from uncomp_cli.errors import UncompError

if TYPE_CHECKING:
    from uncomp_cli.engine.cache import GroupedKVCache

#: Name under which the grouped attention (and its mask function) is registered in transformers.
ATTN_IMPLEMENTATION = "uncomp"
_CACHE_ATTR = "_uncomp_cache"


def grouped_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function for grouped caches (registered as ``"uncomp"``).

    query: [B, H_q, q, d]; key/value: [B, H_kv, q, d] (the new tokens, as ``update`` returned them);
    attention_mask: the 2-D padding mask [B, seen + q] from :func:`padding_mask`, or None (no
    padding: plain causal). Returns ([B, q, H_q, d], None).
    """
    cache = getattr(module, _CACHE_ATTR, None)
    if cache is None:
        raise UncompError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} needs a grouped KV cache; run the model "
            "inside the policy's attach()"
        )
    valid = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise UncompError("the grouped KV cache takes a 2-D padding mask [batch, tokens], not a 4-D mask")
        valid = attention_mask[:, -query.shape[2]:].to(torch.bool)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = cache.layers[module.layer_idx].attend(query, key, value, valid, scaling, kwargs.get("position_ids"),
                                                sliding_window=kwargs.get("sliding_window"),
                                                softcap=kwargs.get("softcap"))
    return out, None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset: int = 0,
                 mask_function=None, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor | None:
    """Mask function for ``"uncomp"``: pass the 2-D padding mask through, build nothing.

    The grouped layer applies its own per-group validity and causal rule, so a 4-D mask (sized
    for one length) would be both wasted and wrong.
    """
    return attention_mask


def register_grouped_attention() -> None:
    """Make ``"uncomp"`` an attention implementation (process-wide; idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, grouped_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)


#: Architectures whose attention, RoPE and decoder-layer arguments the compressed caches are tested on.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


def check_supported(config) -> None:
    """Compressed caches and prefill pruning rely on the attention interface, rotary positions and
    decoder-layer arguments of the tested architectures; refuse others in one line."""
    model_type = getattr(config, "model_type", "unknown")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UncompError(f"compressed caches support {', '.join(SUPPORTED_MODEL_TYPES)} models; "
                          f"this model is {model_type!r} (use --method full)")


def sliding_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention), as transformers' caches read the
    config (``layer_types``, or a ``sliding_window`` on every layer)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    types, kwargs = get_layer_types_and_kwargs(config)
    return [extra.get("sliding_window") if kind == "sliding_attention" else None for kind, extra in zip(types, kwargs)]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers`` for Llama-like models)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(hasattr(lay, "self_attn") for lay in layers):
        raise UncompError(f"{type(model).__name__} is not a decoder-only model with self-attention layers")
    return layers


@contextlib.contextmanager
def use_grouped_cache(model: torch.nn.Module, cache: GroupedKVCache) -> Iterator[GroupedKVCache]:
    """Run ``model`` with grouped attention over ``cache``; restore the previous attention after."""
    check_supported(model.config)
    attention = [layer.self_attn for layer in decoder_layers(model)]
    if len(attention) != len(cache.layers):
        raise UncompError(f"the cache has {len(cache.layers)} layers but the model has {len(attention)}")
    register_grouped_attention()
    previous = model.config._attn_implementation
    try:
        for module in attention:
            setattr(module, _CACHE_ATTR, cache)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        yield cache
    finally:
        model.set_attn_implementation(previous)
        for module in attention:
            if hasattr(module, _CACHE_ATTR):
                delattr(module, _CACHE_ATTR)
