"""A diagnostic (issue 22, multi-query): would more tokens in fewer bits answer what 10 % cannot?

Multi-query answers come back with the budget (20 % keeps what 10 % loses), not with any selection
tried. A cache that stored more tokens in fewer bytes would buy that budget: KIVI's scheme, keys
quantised per channel (over each head's kept tokens) and values per token in groups of 32 channels,
asymmetric, to ``bits`` bits. Here the kept keys and values are quantised and dequantised in place
(simulated: they are still stored at full width), only to measure what the rounding costs before
anyone builds the storage. Not in the library, and never a result about bytes.
"""

from __future__ import annotations

import torch

#: Channels that share a value's scale and zero point.
VALUE_GROUP = 32


def fake_quantise(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x rounded to ``bits``-bit asymmetric levels, min and max taken along ``dim``."""
    low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / (2 ** bits - 1)
    return ((x - low) / scale).round() * scale + low


def quantise_group(keys: torch.Tensor, values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys/values [B, h, T, d]: keys per channel (over T), values per token in groups of channels."""
    shape = values.shape
    grouped = values.float().reshape(*shape[:-1], shape[-1] // VALUE_GROUP, VALUE_GROUP)
    values = fake_quantise(grouped, bits, -1).reshape(shape).to(values.dtype)
    return fake_quantise(keys.float(), bits, 2).to(keys.dtype), values


def with_quantised(allocate, bits: int):
    """``allocate``, then every layer's kept keys and values rounded to ``bits`` bits."""
    def allocate_quantised(layers, recorded, **kwargs):
        allocate(layers, recorded, **kwargs)
        for layer in layers:
            for group in layer.groups:
                keys, values = quantise_group(group.keys, group.values, bits)
                group.store(keys, values, group.valid, group.positions)
    return allocate_quantised
